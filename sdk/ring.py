"""Shared-memory syscall rings: the byte layout both sides agree on, and the agent's side of it.

Each agent has two rings, io_uring-style: the submission ring (SQ, agent → kernel) and the
completion ring (CQ, kernel → agent). One ring is one shared segment:

    offset 0     u32 tail    producer-owned; on its own 64-byte line
    offset 4     u32 advice  producer-owned, completion ring only: how many microseconds the
                             kernel advises a waiting agent to spin before it sleeps (0: don't)
    offset 64    u32 head    consumer-owned; on its own line, so the two sides never
                             false-share the counter the other one spins on
    offset 68    u32 flags   consumer-owned: POLLING (1) while the consumer is looking at the
                             ring without waiting for a doorbell; 0 means "ring me"
    offset 128   capacity slots of slot_size bytes each (capacity a power of two):
                   +0 u32 seq      position + 1 of the entry this slot holds, stored last
                   +4 u32 length   payload bytes
                   +8 payload      up to slot_size - 8 bytes

Counters run free modulo 2**32: the slot of position p is `p & (capacity - 1)`, and
`(tail - head) mod 2**32` is the number of published, unconsumed entries. The geometry is not in
the segment: the kernel keeps it in its own memory and hands it to the agent in a `RingSpec`.

Doorbells are skipped while the other side polls, as io_uring's SQPOLL skips io_uring_enter
unless IORING_SQ_NEED_WAKEUP is set. A consumer going to sleep clears POLLING, fences, and
looks at the tail once more; a producer stores the tail, fences, and rings unless POLLING is
set. With a full fence on both sides (Dekker's pattern) one of them sees the other's store, so
no wakeup is lost; see `fence`.

The agent trusts the kernel, so this side checks little. The kernel's side (`kernel.doors.ring`)
trusts nothing it reads from the segment; it shares only the layout helpers defined here.
"""

from __future__ import annotations

import math
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import msgspec
import posix_ipc

CACHE_LINE = 64
TAIL_OFFSET = 0
HEAD_OFFSET = CACHE_LINE
HEADER_BYTES = 2 * CACHE_LINE
SLOT_HEADER_BYTES = 8  # seq u32, length u32
MIN_SLOT_SIZE = 16
MAX_SLOT_SIZE = 1 << 20
MAX_CAPACITY = 1 << 16
COUNTER_MASK = 0xFFFF_FFFF

# Word indices of the counters in the segment's u32 view.
TAIL_WORD = TAIL_OFFSET // 4
HEAD_WORD = HEAD_OFFSET // 4
FLAGS_WORD = HEAD_WORD + 1
ADVICE_WORD = TAIL_WORD + 1
POLLING = 1  # the flags value meaning "no doorbell needed: I am looking"

SLOT_HEADER = struct.Struct("II")  # seq, length; only ever parsed from a private copy

Buffer = mmap.mmap | bytearray | memoryview

_barrier = threading.Lock()


def fence() -> None:
    """A full memory barrier between this thread's earlier stores and later loads.

    CPython has no fence primitive; acquiring a lock is an atomic read-modify-write (a `lock`
    prefixed instruction on x86-64, which orders stores before later loads) and costs ~0.1 µs.
    Where the lock's RMW is weaker than a full barrier (arm64's acquire/release atomics), a
    sleeper can miss one doorbell; every sleeper here waits with a bounded slice and looks at
    the ring again after it, so the cost there is latency, never a hang.
    """
    _barrier.acquire()
    _barrier.release()


class RingError(Exception):
    """A ring used wrongly (bad geometry, closed ring, unreachable segment)."""


@dataclass(frozen=True, slots=True)
class Geometry:
    """A ring's shape. The kernel decides it and never re-reads it from shared memory."""

    capacity: int
    slot_size: int

    def __post_init__(self) -> None:
        cap, size = self.capacity, self.slot_size
        if not isinstance(cap, int) or not 1 <= cap <= MAX_CAPACITY or cap & (cap - 1):
            raise RingError(f"capacity must be a power of two in 1..{MAX_CAPACITY}, not {cap!r}")
        # Multiples of 8 keep every slot's seq and length words aligned.
        if not isinstance(size, int) or not MIN_SLOT_SIZE <= size <= MAX_SLOT_SIZE or size % 8:
            raise RingError(f"slot_size must be a multiple of 8 in {MIN_SLOT_SIZE}.."
                            f"{MAX_SLOT_SIZE}, not {size!r}")

    @property
    def mask(self) -> int:
        return self.capacity - 1

    @property
    def payload_capacity(self) -> int:
        return self.slot_size - SLOT_HEADER_BYTES

    @property
    def size(self) -> int:
        """Bytes of one ring segment."""
        return HEADER_BYTES + self.capacity * self.slot_size


class RingView:
    """A segment seen two ways: `mem` (bytes) for payloads, `words` (native u32) for the
    counters and slot headers that the other side reads while they change.

    Shared words are stored and loaded only through `words`. Item access on a memoryview cast
    to "I" copies one fixed-size word (memcpy of sizeof(unsigned int)), a single aligned 32-bit
    store or load, atomic on x86-64 and arm64. `struct.pack_into` is not: it zeroes the
    destination before packing into it, so a concurrent reader can see 0 in between (measured
    on CPython 3.11: 2-6% of reads of a word being rewritten with its own value), which looks
    like a counter jumping back by up to 2**32 (tests/kernel/doors/test_ring_busy.py keeps it out).
    """

    __slots__ = ("mem", "words")

    def __init__(self, buf: Buffer, geometry: Geometry) -> None:
        try:
            whole = memoryview(buf).cast("B")
        except (TypeError, ValueError) as exc:
            raise RingError(f"not a usable ring buffer: {exc}") from None
        try:
            # This one check keeps every later access in bounds: all offsets come from the
            # geometry, none from the segment.
            if whole.readonly or whole.nbytes < geometry.size:
                raise RingError(f"ring buffer must be writable and hold {geometry.size} bytes")
            self.mem = whole[:geometry.size]
            self.words = self.mem.cast("I")
        finally:
            whole.release()

    def release(self) -> None:
        """Let go of the buffer, so that the mmap behind it can be closed."""
        self.words.release()
        self.mem.release()


def format_ring(buf: Buffer, geometry: Geometry, start: int = 0, *, zeroed: bool = False
                ) -> None:
    """Initialise a segment: both counters at `start`, and every slot reading as unpublished
    during the first lap (stamped as written one lap ago), wrap included.

    A slot whose seq word is 0 already reads as unpublished for every position but 2**32 - 1
    (seq is position + 1), so on a `zeroed` segment (a new memfd or shm object) only the slot of
    that position is stamped, and only if the first lap reaches it: formatting then writes the
    header line and touches none of the slots' pages. Stamping every slot faulted in all of a
    fresh segment (1 MB per agent at the default geometry): a quarter of a spawn's time, and
    memory an idle agent never uses."""
    view = RingView(buf, geometry)
    words = view.words
    try:
        start &= COUNTER_MASK
        words[TAIL_WORD] = words[HEAD_WORD] = start
        words[FLAGS_WORD] = words[ADVICE_WORD] = 0
        if zeroed:
            last = COUNTER_MASK  # the one position whose seq is 0
            lap = [last] if (last - start) & COUNTER_MASK < geometry.capacity else []
        else:
            lap = range(start, start + geometry.capacity)
        for pos in lap:
            word = (HEADER_BYTES + (pos & geometry.mask) * geometry.slot_size) // 4
            words[word] = (pos - geometry.capacity + 1) & COUNTER_MASK
            words[word + 1] = 0
    finally:
        view.release()


def write_slot(view: RingView, offset: int, position: int, payload: bytes) -> None:
    """Fill the slot at `offset` with entry `position`; the caller then publishes the tail.

    Publish order is payload → length → seq → tail → doorbell. CPython has no fences, and an
    mmap slice assignment is a plain memcpy, so the order rests on three facts:
    - x86-64 is TSO: stores become visible in program order and loads are not reordered with
      loads, so a consumer that reads the tail and then copies the slot sees everything stored
      before that tail;
    - every shared word is one aligned 32-bit store (see `RingView`), so none is seen torn;
    - the doorbell is a syscall (eventfd write on this side, read or poll on the other), a full
      barrier on every architecture.
    On a weakly ordered CPU (arm64) a consumer polling without doorbells may see the new tail
    before the slot. The seq word turns that into something it can detect: a slot whose seq is
    not position + 1 is not published yet, so it looks again later instead of parsing stale
    bytes. Nothing here can make a payload torn inside a correctly sequenced slot detectable on
    such a CPU; the kernel treats every payload as hostile anyway, so the worst case there is
    an EINVAL for that one request, never a kernel fault.
    """
    n = len(payload)
    view.mem[offset + SLOT_HEADER_BYTES:offset + SLOT_HEADER_BYTES + n] = payload
    word = offset >> 2
    view.words[word + 1] = n
    view.words[word] = (position + 1) & COUNTER_MASK


class SubmissionProducer:
    """The agent's end of its submission ring: it owns the tail."""

    def __init__(self, buf: Buffer, capacity: int, slot_size: int) -> None:
        self.geometry = Geometry(capacity, slot_size)
        self._view = RingView(buf, self.geometry)
        self._words = self._view.words
        self._mask = self.geometry.mask
        self._limit = self.geometry.payload_capacity
        self._tail = self._words[TAIL_WORD]
        # The last head seen; re-read only when the ring looks full (the Disruptor's cached
        # gating sequence), so a push costs no read of the kernel's cache line.
        self._head = self._words[HEAD_WORD]

    def push(self, payload: bytes) -> bool:
        """Publish one entry; False when the ring is full or the payload does not fit a slot.
        Ring the doorbell afterwards (`AgentRings.submit` does both)."""
        if not self._write(payload):
            return False
        self._words[TAIL_WORD] = self._tail
        return True

    def push_many(self, payloads: Iterable[bytes]) -> int:
        """Publish entries in order up to the first that does not fit; one tail store for
        all of them. Returns how many were published."""
        n = 0
        for payload in payloads:
            if not self._write(payload):
                break
            n += 1
        if n:
            self._words[TAIL_WORD] = self._tail
        return n

    def consumer_polling(self) -> bool:
        """Whether the kernel is polling this ring (no doorbell needed). Call after `fence`."""
        return self._words[FLAGS_WORD] == POLLING

    def free(self) -> int:
        """Slots the next pushes may fill without waiting for the kernel."""
        self._head = self._words[HEAD_WORD]
        return self.geometry.capacity - ((self._tail - self._head) & COUNTER_MASK)

    def _write(self, payload: bytes) -> bool:
        if len(payload) > self._limit:
            return False
        cap = self._mask + 1
        if (self._tail - self._head) & COUNTER_MASK >= cap:
            self._head = self._words[HEAD_WORD]
            if (self._tail - self._head) & COUNTER_MASK >= cap:
                return False
        offset = HEADER_BYTES + (self._tail & self._mask) * self.geometry.slot_size
        write_slot(self._view, offset, self._tail, payload)
        self._tail = (self._tail + 1) & COUNTER_MASK
        return True

    def release(self) -> None:
        self._view.release()


class CompletionConsumer:
    """The agent's end of its completion ring: it owns the head."""

    def __init__(self, buf: Buffer, capacity: int, slot_size: int) -> None:
        self.geometry = Geometry(capacity, slot_size)
        self._view = RingView(buf, self.geometry)
        self._head = self._view.words[HEAD_WORD]

    def pending(self) -> bool:
        """Whether the kernel has published completions not yet popped (one load)."""
        return self._view.words[TAIL_WORD] != self._head

    def advice(self) -> float:
        """Seconds the kernel advises a waiter to spin before sleeping."""
        return self._view.words[ADVICE_WORD] / 1e6

    def set_polling(self, polling: bool) -> None:
        """Tell the kernel whether it must ring the doorbell for new completions."""
        self._view.words[FLAGS_WORD] = POLLING if polling else 0

    def pop(self) -> bytes | None:
        """The next completion, or None when there is none yet."""
        got = self.pop_many(1)
        return got[0] if got else None

    def pop_many(self, max_n: int) -> list[bytes]:
        """Up to `max_n` completions in order; one head store for all of them."""
        geo = self.geometry
        mem, words, head = self._view.mem, self._view.words, self._head
        available = (words[TAIL_WORD] - head) & COUNTER_MASK
        if available > geo.capacity:
            raise RingError(f"completion ring corrupt: {available} entries published")
        out: list[bytes] = []
        for _ in range(min(available, max_n)):
            offset = HEADER_BYTES + (head & geo.mask) * geo.slot_size
            slot = bytes(mem[offset:offset + geo.slot_size])
            seq, length = SLOT_HEADER.unpack_from(slot)
            if seq != (head + 1) & COUNTER_MASK:
                break  # published tail, slot not visible yet (weak ordering): next time
            if length > geo.payload_capacity:
                raise RingError(f"completion ring corrupt: length {length} at {head}")
            out.append(slot[SLOT_HEADER_BYTES:SLOT_HEADER_BYTES + length])
            head = (head + 1) & COUNTER_MASK
        if out:
            self._head = head
            # Stored only after the copies: from here on the kernel may reuse those slots.
            words[HEAD_WORD] = head
        return out

    def release(self) -> None:
        self._view.release()


Fd = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
ShmName = Annotated[str, msgspec.Meta(pattern=r"^/agentos-[0-9a-f]{32}$")]


class RingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an agent needs to map its rings: the geometry and where each segment is.

    A segment is an inherited fd number (agents the kernel spawns) or a POSIX shm name (agents
    that connect on their own). Doorbells are eventfds and exist only in the fd form: an fd
    cannot be opened by name, so a named agent rings over its ZeroMQ connection instead.
    """

    capacity: Annotated[int, msgspec.Meta(ge=1, le=MAX_CAPACITY)]
    slot_size: Annotated[int, msgspec.Meta(ge=MIN_SLOT_SIZE, le=MAX_SLOT_SIZE)]
    submission: Fd | ShmName
    completion: Fd | ShmName
    submission_doorbell: Fd | None = None  # the agent writes it after publishing entries
    completion_doorbell: Fd | None = None  # the kernel writes it; the agent polls it


def _map(segment: int | str, size: int) -> mmap.mmap:
    if isinstance(segment, str):
        try:
            shm = posix_ipc.SharedMemory(segment)
        except posix_ipc.Error as exc:
            raise RingError(f"cannot open ring segment {segment}: {exc}") from None
        fd = shm.fd
    else:
        shm, fd = None, segment
    try:
        # Mapping past the end of the file would fault (SIGBUS) on first touch.
        if os.fstat(fd).st_size < size:
            raise RingError(f"ring segment is smaller than {size} bytes")
        return mmap.mmap(fd, size)  # mmap keeps its own dup of the fd
    except OSError as exc:
        raise RingError(f"cannot map ring segment: {exc}") from None
    finally:
        if shm is not None:
            shm.close_fd()


def _write_eventfd(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # the counter is saturated: the other side already has a wakeup pending


def _clear_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class AgentRings:
    """An agent's two rings and their doorbells, attached from the kernel's `RingSpec`."""

    def __init__(self, geometry: Geometry, maps: tuple[mmap.mmap, mmap.mmap],
                 submission_doorbell: int | None, completion_doorbell: int | None) -> None:
        self.geometry = geometry
        self._maps = maps
        self.submissions = SubmissionProducer(maps[0], geometry.capacity, geometry.slot_size)
        self.completions = CompletionConsumer(maps[1], geometry.capacity, geometry.slot_size)
        self.submission_doorbell = submission_doorbell
        self.completion_doorbell = completion_doorbell
        self._poll: select.poll | None = None
        if completion_doorbell is not None:
            self._poll = select.poll()
            self._poll.register(completion_doorbell, select.POLLIN)

    @classmethod
    def attach(cls, spec: RingSpec) -> AgentRings:
        """Map both segments (by inherited fd or by name) and take the doorbells' fds."""
        geometry = Geometry(spec.capacity, spec.slot_size)
        sq = _map(spec.submission, geometry.size)
        try:
            cq = _map(spec.completion, geometry.size)
        except RingError:
            sq.close()
            raise
        return cls(geometry, (sq, cq), spec.submission_doorbell, spec.completion_doorbell)

    def submit(self, payloads: Iterable[bytes]) -> int:
        """Publish entries and ring the doorbell once for all of them (one syscall per batch,
        like io_uring_enter). Returns how many were published."""
        n = self.submissions.push_many(payloads)
        if n:
            self.ring_doorbell()
        return n

    def ring_doorbell(self) -> bool:
        """Tell the kernel there are new submissions, unless it is polling the ring; a no-op
        without an eventfd doorbell. True if it rang."""
        if self.submission_doorbell is None:
            return False
        fence()  # the tail store before the flags load (see the module docstring)
        if self.submissions.consumer_polling():
            return False
        _write_eventfd(self.submission_doorbell)
        return True

    def spin(self, seconds: float, busy_seconds: float = 0.0) -> bool:
        """Look for completions for up to `seconds` without sleeping, the kernel told not to
        ring meanwhile; True as soon as there are some. While the kernel is polling this
        agent's submission ring (it is awake and working on it) the look goes on up to
        `busy_seconds`. Both are capped by the kernel's advice in the completion ring, which
        is 0 when more agents are busy than there are spare CPUs: spinners would then only
        take the CPU from the kernel they wait for. On False it has cleared the flag, fenced
        and looked once more, so anything published later rings the doorbell and the caller
        may block on it."""
        cq = self.completions
        if cq.pending():
            return True
        advice = cq.advice()
        seconds, busy_seconds = min(seconds, advice), min(busy_seconds, advice)
        if seconds > 0:
            cq.set_polling(True)
            start = time.perf_counter()
            end, busy_end = start + seconds, start + max(seconds, busy_seconds)
            sq = self.submissions
            try:
                while not cq.pending():
                    now = time.perf_counter()
                    if now >= end and (now >= busy_end or not sq.consumer_polling()):
                        break
                    os.sched_yield()  # on an oversubscribed CPU, let the kernel run
                else:
                    return True
            finally:
                cq.set_polling(False)
        fence()  # the flag store before the tail load
        return cq.pending()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the kernel rings the completion doorbell or `timeout` seconds pass;
        True if it rang. Pop until empty before waiting again: the doorbell is cleared here,
        before the pops, so a completion published after them rings it anew and none is
        missed."""
        if self._poll is None or self.completion_doorbell is None:
            raise RingError("no completion doorbell: wait on the ZeroMQ connection instead")
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        if not self._poll.poll(ms):
            return False
        _clear_eventfd(self.completion_doorbell)
        return True

    def close(self) -> None:
        """Unmap both segments. The doorbell fds belong to the process that received them."""
        self.submissions.release()
        self.completions.release()
        for m in self._maps:
            m.close()
