"""A hostile agent owns its ring's bytes: the kernel's side must survive anything written there."""

from __future__ import annotations

import errno
import mmap
import os
import random
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.doors.ring import (
    CompletionProducer,
    FaultKind,
    RingFault,
    RingPair,
    SubmissionConsumer,
)
from sdk.ring import (
    COUNTER_MASK,
    HEAD_OFFSET,
    HEADER_BYTES,
    TAIL_OFFSET,
    AgentRings,
    Geometry,
    RingError,
    SubmissionProducer,
    format_ring,
)

GEOMETRY = Geometry(capacity=8, slot_size=64)
MAX_FAULTS = 8

U32 = struct.Struct("I")  # the test's own hands on a segment, single-threaded


class CheckedConsumer:
    """A SubmissionConsumer whose every drain is held to the kernel's contract."""

    def __init__(self, ring: SubmissionConsumer) -> None:
        self.ring = ring
        self.geometry = ring.geometry
        self.faults_seen = ring.faults

    @classmethod
    def over(cls, buf: bytearray, max_faults: int = MAX_FAULTS, start: int = 0) -> CheckedConsumer:
        return cls(SubmissionConsumer(buf, GEOMETRY.capacity, GEOMETRY.slot_size,
                                      max_faults=max_faults, start=start))

    def drain(self, max_n: int) -> list[bytes]:
        was_quarantined = self.ring.quarantined
        payloads, faults = self.ring.drain(max_n)  # anything but a return fails the test
        limit = self.geometry.payload_capacity
        assert all(isinstance(p, bytes) and len(p) <= limit for p in payloads)
        assert all(isinstance(f, RingFault) and isinstance(f.kind, FaultKind)
                   and len(f.data) <= limit for f in faults)
        entries = len(payloads) + sum(f.kind is not FaultKind.TAIL for f in faults)
        assert entries <= max(max_n, 0)
        self.faults_seen += len(faults)
        assert self.ring.faults == self.faults_seen
        assert self.ring.quarantined == (self.faults_seen >= self.ring.max_faults)
        if was_quarantined:
            assert payloads == [] and faults == []
        return payloads


def _u32(buf: bytearray | memoryview, offset: int) -> int:
    return U32.unpack_from(buf, offset)[0]


def _slot(index: int) -> int:
    return HEADER_BYTES + (index % GEOMETRY.capacity) * GEOMETRY.slot_size


# One hostile step: a well-formed push, or a rewrite of some part of the segment.
hostile_steps = st.one_of(
    st.tuples(st.just("push"), st.binary(max_size=80)),
    st.tuples(st.just("bytes"), st.integers(0, GEOMETRY.size - 1), st.binary(min_size=1,
                                                                            max_size=80)),
    st.tuples(st.just("tail"), st.integers(0, COUNTER_MASK)),
    st.tuples(st.just("tail_back"), st.integers(1, 20)),
    st.tuples(st.just("tail_forward"), st.integers(1, 20)),
    st.tuples(st.just("seq"), st.integers(0, 7), st.integers(0, COUNTER_MASK)),
    st.tuples(st.just("length"), st.integers(0, 7), st.integers(0, COUNTER_MASK)),
    st.tuples(st.just("drain"), st.integers(-1, 12)),
)


def _apply(buf: memoryview, step: tuple) -> None:
    kind, *args = step
    tail = _u32(buf, TAIL_OFFSET)
    if kind == "push":
        # A producer that believes whatever the segment says right now.
        SubmissionProducer(buf, GEOMETRY.capacity, GEOMETRY.slot_size).push(args[0])
    elif kind == "bytes":
        offset, data = args
        data = data[:GEOMETRY.size - offset]
        buf[offset:offset + len(data)] = data
    elif kind == "tail":
        U32.pack_into(buf, TAIL_OFFSET, args[0])
    elif kind == "tail_back":
        U32.pack_into(buf, TAIL_OFFSET, (tail - args[0]) & COUNTER_MASK)
    elif kind == "tail_forward":
        U32.pack_into(buf, TAIL_OFFSET, (tail + args[0]) & COUNTER_MASK)
    elif kind == "seq":
        U32.pack_into(buf, _slot(args[0]), args[1])
    elif kind == "length":
        U32.pack_into(buf, _slot(args[0]) + 4, args[1])


GUARD = b"OUTSIDE!" * 8  # past the segment's end: must never be read or written


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(hostile_steps, max_size=60), start=st.sampled_from([0, 2**32 - 3]))
def test_hostile_rewrites_between_drains(steps: list[tuple], start: int) -> None:
    buf = bytearray(GEOMETRY.size) + GUARD
    format_ring(buf, GEOMETRY, start)
    consumer = CheckedConsumer.over(buf, start=start)
    segment = memoryview(buf)[:GEOMETRY.size]
    seen: list[bytes] = []
    for step in steps:
        if step[0] == "drain":
            seen += consumer.drain(step[1])
        else:
            _apply(segment, step)
    for _ in range(3):
        seen += consumer.drain(GEOMETRY.capacity)
    assert buf[GEOMETRY.size:] == GUARD
    assert not any(b"OUTSIDE" in p for p in seen)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(st.one_of(st.integers(0, COUNTER_MASK),
                                st.lists(st.binary(max_size=70), max_size=12)), max_size=40))
def test_hostile_completion_heads(steps: list[int | list[bytes]]) -> None:
    """The agent owns the CQ head: whatever it writes there, the kernel's pushes answer True or
    False, stay inside the segment and stop once the ring is quarantined."""
    buf = bytearray(GEOMETRY.size) + GUARD
    format_ring(buf, GEOMETRY)
    producer = CompletionProducer(buf, GEOMETRY.capacity, GEOMETRY.slot_size)
    for step in steps:
        if isinstance(step, int):
            U32.pack_into(buf, HEAD_OFFSET, step)
            continue
        was_quarantined = producer.quarantined
        n = producer.push_many(step)
        assert 0 <= n <= len(step) and (n == 0 or not was_quarantined)
        assert producer.quarantined == (producer.faults >= producer.max_faults)
    assert buf[GEOMETRY.size:] == GUARD


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(segment=st.binary(min_size=GEOMETRY.size, max_size=GEOMETRY.size),
       drains=st.lists(st.integers(0, 20), min_size=1, max_size=12))
def test_random_bytes_over_the_whole_segment(segment: bytes, drains: list[int]) -> None:
    consumer = CheckedConsumer.over(bytearray(segment))
    for max_n in drains:
        consumer.drain(max_n)


def test_many_random_word_mutations_never_escape() -> None:
    """S6 in miniature: many random header and slot mutations with drains in between."""
    rng = random.Random(6)
    buf = bytearray(GEOMETRY.size)
    format_ring(buf, GEOMETRY)
    consumer = CheckedConsumer.over(buf, max_faults=2**62)
    for i in range(200_000):
        offset = rng.choice([TAIL_OFFSET, _slot(rng.randrange(8)), _slot(rng.randrange(8)) + 4,
                             rng.randrange(GEOMETRY.size - 4)])
        U32.pack_into(buf, offset, rng.choice([rng.getrandbits(32), i, i + 1, 57, 56, 0]))
        if i % 4 == 0:
            consumer.drain(rng.randrange(10))
    assert consumer.faults_seen > 1000


def test_each_kind_of_bad_entry_is_a_typed_fault_and_the_ring_resynchronises() -> None:
    buf = bytearray(GEOMETRY.size)
    format_ring(buf, GEOMETRY)
    agent = SubmissionProducer(buf, GEOMETRY.capacity, GEOMETRY.slot_size)
    consumer = SubmissionConsumer(buf, GEOMETRY.capacity, GEOMETRY.slot_size)
    request = b"\x94\x01\x2a\xa8sys.null\xa0"  # msgpack [1, 42, "sys.null", ""]
    assert agent.push_many([b"a", request, b"c", b"d"]) == 4
    U32.pack_into(buf, _slot(1) + 4, 10_000)  # entry 1: huge length
    U32.pack_into(buf, _slot(2), 99)  # entry 2: wrong seq
    payloads, faults = consumer.drain(8)
    assert payloads == [b"a"]  # stops at the bad seq, gives it one more look
    assert [f.kind for f in faults] == [FaultKind.LENGTH]
    assert faults[0].data.startswith(request) and faults[0].position == 1
    payloads, faults = consumer.drain(8)
    assert payloads == [b"d"]  # entry 2 skipped, entry 3 in its own slot as ever
    assert [(f.kind, f.position) for f in faults] == [(FaultKind.SEQ, 2)]
    assert faults[0].data == b"c"
    # The tail moved back, then far forward: faults, nothing consumed.
    U32.pack_into(buf, TAIL_OFFSET, 2)
    assert consumer.drain(8) == ([], [consumer.last_fault])
    U32.pack_into(buf, TAIL_OFFSET, 4 + GEOMETRY.capacity + 1)
    assert consumer.drain(8)[1][0].kind is FaultKind.TAIL
    # Once the tail is sane again the ring carries on from where the kernel's head is.
    U32.pack_into(buf, TAIL_OFFSET, 4)
    assert agent.push(b"e")
    assert consumer.drain(8) == ([b"e"], [])
    assert consumer.faults == 4 and not consumer.quarantined


def test_advancing_the_tail_without_writing_is_a_fault_with_nothing_to_recover() -> None:
    buf = bytearray(GEOMETRY.size)
    format_ring(buf, GEOMETRY)
    consumer = SubmissionConsumer(buf, GEOMETRY.capacity, GEOMETRY.slot_size)
    U32.pack_into(buf, TAIL_OFFSET, 3)
    assert consumer.drain(8) == ([], [])
    payloads, faults = consumer.drain(8)
    assert payloads == [] and [f.kind for f in faults] == [FaultKind.SEQ]
    assert faults[0].data == b""


@settings(max_examples=300, deadline=None)
@given(capacity=st.sampled_from([1, 2, 8, 256]),
       start=st.one_of(st.integers(0, COUNTER_MASK),
                       st.integers(0, 300).map(lambda k: (COUNTER_MASK - k) & COUNTER_MASK)))
def test_a_zeroed_segment_formats_without_touching_its_slots(capacity: int, start: int) -> None:
    """`zeroed` formatting (new memfds: the kernel's default) writes only the header and the
    slot of position 2**32 - 1 when the first lap reaches it: every slot still reads as
    unpublished for the whole first lap, wrap included, as with the full stamp."""
    geometry = Geometry(capacity, 16)
    full, zeroed = bytearray(geometry.size), bytearray(geometry.size)
    format_ring(full, geometry, start)
    format_ring(zeroed, geometry, start, zeroed=True)
    for buf in (full, zeroed):
        for pos in range(start, start + capacity):
            seq = U32.unpack_from(buf, HEADER_BYTES + (pos & geometry.mask) * 16)[0]
            assert seq != (pos + 1) & COUNTER_MASK, (buf is zeroed, pos)
    stamped = {i for i in range(capacity) if any(zeroed[HEADER_BYTES + i * 16:][:16])}
    wraps = (COUNTER_MASK - start) & COUNTER_MASK < capacity
    assert stamped == ({COUNTER_MASK & geometry.mask} if wraps else set())


def test_quarantine_after_max_faults_and_then_nothing() -> None:
    buf = bytearray(GEOMETRY.size)
    format_ring(buf, GEOMETRY)
    agent = SubmissionProducer(buf, GEOMETRY.capacity, GEOMETRY.slot_size)
    consumer = SubmissionConsumer(buf, GEOMETRY.capacity, GEOMETRY.slot_size, max_faults=3)
    U32.pack_into(buf, TAIL_OFFSET, 1000)
    for n in range(1, 4):
        assert consumer.drain(8)[1][0].kind is FaultKind.TAIL
        assert consumer.faults == n
    assert consumer.quarantined
    U32.pack_into(buf, TAIL_OFFSET, 0)
    assert agent.push(b"valid")
    assert consumer.drain(8) == ([], [])


def test_geometry_is_checked_against_the_buffer() -> None:
    with pytest.raises(RingError):
        SubmissionConsumer(bytearray(GEOMETRY.size - 1), 8, 64)
    with pytest.raises(RingError):
        SubmissionConsumer(bytes(GEOMETRY.size), 8, 64)  # read-only
    for capacity, slot_size in ((3, 64), (0, 64), (2**17, 64), (8, 12), (8, 60), (8, 2**21)):
        with pytest.raises(RingError):
            Geometry(capacity, slot_size)
    consumer = SubmissionConsumer(bytearray(GEOMETRY.size), 8, 64)
    consumer.release()
    with pytest.raises(RingError):
        consumer.drain(1)


def test_hostile_completion_head_makes_the_kernel_fall_back_not_fail() -> None:
    with RingPair.create(capacity=4, slot_size=64, max_faults=2) as pair:
        agent = AgentRings.attach(pair.spec())
        assert pair.completions.push_many([b"1", b"2", b"3", b"4", b"5"]) == 4
        assert pair.completions.push(b"full") is False  # the agent is not consuming
        assert agent.completions.pop_many(2) == [b"1", b"2"]
        assert pair.completions.push(b"5")
        with mmap.mmap(pair.fds()[1], pair.geometry.size) as cq:
            U32.pack_into(cq, HEAD_OFFSET, 1000)  # ahead of the kernel's tail
            assert pair.completions.push(b"6") is False
            U32.pack_into(cq, HEAD_OFFSET, (0 - 50) & COUNTER_MASK)  # far behind it
            assert pair.completions.push(b"7") is False
        assert pair.completions.faults == 2 and pair.quarantined
        fault = pair.completions.last_fault
        assert fault is not None and fault.kind is FaultKind.HEAD
        assert pair.complete([b"8"]) == 0
        agent.close()


def test_a_saturated_doorbell_does_not_make_the_kernel_raise() -> None:
    with RingPair.create(capacity=4, slot_size=64) as pair:
        spec = pair.spec()
        assert spec.completion_doorbell is not None
        os.eventfd_write(spec.completion_doorbell, 0xFFFF_FFFF_FFFF_FFFE)
        pair.notify()
        os.eventfd_write(pair.submission_doorbell, 0xFFFF_FFFF_FFFF_FFFE)
        assert pair.acknowledge() == 0xFFFF_FFFF_FFFF_FFFE
        assert pair.acknowledge() == 0


def test_an_agent_cannot_shrink_its_segment_under_the_kernel() -> None:
    """Truncating a mapped segment would make the kernel's next read SIGBUS; memfds are sealed."""
    with RingPair.create(capacity=4, slot_size=64) as pair:
        for fd in pair.fds()[:2]:
            with pytest.raises(OSError) as exc:
                os.ftruncate(fd, 0)
            assert exc.value.errno == errno.EPERM
            reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(OSError):
                    os.ftruncate(reopened, 16)
            finally:
                os.close(reopened)
        assert pair.drain(4) == ([], [])


# A separate process rewriting the whole submission segment as fast as it can.
SCRIBBLER = r"""
import mmap, os, random, struct, sys, time
fd, size, capacity, slot_size, seconds, seed = map(int, sys.argv[1:7])
mm = mmap.mmap(fd, size)
rng = random.Random(seed)
word = struct.Struct("I")
end = time.monotonic() + seconds / 1000
print("ready", flush=True)
while time.monotonic() < end:
    r = rng.random()
    slot = 128 + rng.randrange(capacity) * slot_size
    if r < 0.3:
        offset = rng.randrange(size - 64)
        mm[offset:offset + 64] = os.urandom(64)
    elif r < 0.5:
        word.pack_into(mm, 0, rng.choice([rng.getrandbits(32), rng.randrange(capacity * 3)]))
    elif r < 0.7:
        word.pack_into(mm, slot, rng.getrandbits(32) if r < 0.6 else rng.randrange(64))
    else:
        word.pack_into(mm, slot + 4, rng.choice([rng.getrandbits(32), slot_size - 8, 0]))
"""


def _scribble(pair: RingPair, milliseconds: int, seed: int) -> subprocess.Popen[str]:
    fd = pair.fds()[0]
    geo = pair.geometry
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIBBLER, str(fd), str(geo.size), str(geo.capacity),
         str(geo.slot_size), str(milliseconds), str(seed)],
        pass_fds=[fd], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _echo_round(good: RingPair, agent: AgentRings, round_no: int) -> None:
    """One batch through a well-behaved pair: every entry comes back exactly once, in order."""
    sent = [f"{round_no}:{i}".encode() * 3 for i in range(5)]
    assert agent.submit(sent) == 5
    payloads, faults = good.drain(64)
    assert payloads == sent and faults == []
    assert good.complete(payloads) == 5
    assert agent.completions.pop_many(64) == sent


def test_concurrent_rewrites_from_another_process_while_a_peer_is_served() -> None:
    with RingPair.create(capacity=16, slot_size=64, max_faults=2**62) as victim, \
            RingPair.create(capacity=16, slot_size=64) as good:
        agent = AgentRings.attach(good.spec())
        # Served while it scribbles, for a count of rounds and faults, not a length of time:
        # the scribbler's 60 s only caps a stuck run, and it is stopped once both are reached.
        scribbler = _scribble(victim, 60_000, seed=1)
        checked = CheckedConsumer(victim.submissions)
        rounds = 0
        while rounds < 50 or victim.submissions.faults <= 10:
            assert scribbler.poll() is None, "the scribbler ended before enough rounds"
            for max_n in (1, 4, 16, 64):
                checked.drain(max_n)
            _echo_round(good, agent, rounds)
            rounds += 1
        scribbler.terminate()
        scribbler.wait()
        assert not good.quarantined and good.submissions.faults == 0
        agent.close()


def test_concurrent_rewrites_quarantine_the_offender_within_max_faults() -> None:
    with RingPair.create(capacity=16, slot_size=64) as victim, \
            RingPair.create(capacity=16, slot_size=64) as good:
        agent = AgentRings.attach(good.spec())
        scribbler = _scribble(victim, 300, seed=2)
        drains = 0
        deadline = time.monotonic() + 10
        while not victim.quarantined and time.monotonic() < deadline:
            victim.drain(64)
            drains += 1
        assert victim.quarantined and victim.submissions.faults == MAX_FAULTS
        while scribbler.poll() is None:
            assert victim.drain(64) == ([], [])
            _echo_round(good, agent, drains)
        agent.close()
