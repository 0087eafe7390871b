"""Two processes busy-polling each other's rings, no doorbells: no counter is ever seen torn."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

import msgspec

from kernel.doors.ring import RingPair, SubmissionConsumer
from tests.conftest import ROOT

# An agent that pushes numbered entries in bursts, then spins on the completion ring until their
# echoes are back, complete and in order: the tightest loop there is over the kernel's tail.
AGENT = r"""
import os, random, sys, time
import msgspec
from sdk.ring import AgentRings, RingSpec
spec = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=RingSpec)
total = int(sys.argv[2])
rings = AgentRings.attach(spec)
rng = random.Random(total)
sent = received = 0
deadline = time.monotonic() + 20
while received < total and time.monotonic() < deadline:
    burst = [b"%08d" % i * 4 for i in range(sent, min(total, sent + rng.choice([1, 7, 64])))]
    sent += rings.submissions.push_many(burst) if rng.random() < 0.5 else \
        sum(rings.submissions.push(p) for p in burst[:1])
    while received < sent and time.monotonic() < deadline:
        got = rings.completions.pop_many(64)  # RingError on a torn tail
        for payload in got:
            assert payload == b"echo" + b"%08d" % received * 4, (payload, received)
            received += 1
        if not got:
            os.sched_yield()  # on a loaded machine the kernel may be waiting for this core
print(received, flush=True)
"""


def test_busy_polling_both_ways_sees_no_torn_counter() -> None:
    total = 10_000
    with RingPair.create(capacity=64, slot_size=64) as pair:
        spec = msgspec.msgpack.encode(pair.spec()).hex()
        proc = subprocess.Popen([sys.executable, "-c", AGENT, spec, str(total)], cwd=ROOT,
                                pass_fds=pair.fds(), stdout=subprocess.PIPE, text=True)
        backlog: list[bytes] = []
        served = 0
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if backlog:
                del backlog[:pair.completions.push_many(backlog)]
                continue
            payloads, faults = pair.drain(64)
            assert faults == [], faults
            served += len(payloads)
            if not payloads:
                os.sched_yield()
            backlog = [b"echo" + p for p in payloads]
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and out == f"{total}\n"
        assert served == total


# Republishes one entry as fast as it can, exactly as a producer publishes: the slot through
# `write_slot`, then the tail word. Every value it stores equals the value already there.
REPUBLISHER = r"""
import mmap, sys, time
from sdk.ring import TAIL_WORD, Geometry, RingView, write_slot
fd, seconds = int(sys.argv[1]), float(sys.argv[2])
geometry = Geometry(8, 64)
view = RingView(mmap.mmap(fd, geometry.size), geometry)
write_slot(view, 128 + 5 * 64, 5, b"payload")
view.words[TAIL_WORD] = 6
print("go", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(1000):
        write_slot(view, 128 + 5 * 64, 5, b"payload")
        view.words[TAIL_WORD] = 6
"""


def test_rewriting_a_word_with_its_own_value_is_never_seen_changing() -> None:
    """The single-store property the publish order rests on. `struct.pack_into` lacks it (it
    zeroes its target first): with it, about 6% of these reads saw the tail or seq as 0."""
    with RingPair.create(capacity=8, slot_size=64) as pair:
        fd = pair.fds()[0]
        proc = subprocess.Popen([sys.executable, "-c", REPUBLISHER, str(fd), "60"], cwd=ROOT,
                                pass_fds=[fd], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        # A count of reads while it rewrites, not a length of time: its 60 s only cap a stuck
        # run, and it is stopped once the reads are done.
        with mmap.mmap(fd, pair.geometry.size) as segment:
            for _ in range(20_000):
                consumer = SubmissionConsumer(segment, 8, 64, start=5)
                got = consumer.drain(1)
                consumer.release()
                assert got == ([b"payload"], [])
        assert proc.poll() is None, "the republisher stopped before the reads were done"
        proc.terminate()
        proc.wait()
