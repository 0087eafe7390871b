"""The kernel's side of the syscall rings: consuming a hostile agent's entries, and setup.

Everything the kernel reads from an agent's segment passes through this module, under the rules
of research/security.md §5:

- The geometry lives in these objects only. The only values read from shared memory are the
  agent-owned counter (the SQ tail, the CQ head) and SQ slot contents.
- The SQ tail is read once per drain; `(tail - head) mod 2**32 > capacity` is a fault.
- Each part of a slot is read once: its seq and length words into locals, then (the length
  checked against the geometry) exactly that many payload bytes into a private copy, and only
  the copy is parsed, so an agent rewriting the slot meanwhile cannot make the kernel see two
  different entries (no double fetch) and the kernel copies no more than the entry's bytes.
- A bad entry costs one slot: slots have a fixed size, so skipping it leaves the framing of
  every later entry intact and the consumer resynchronises at the next position. A bad tail
  consumes nothing (there is no trustworthy window), and the next drain reads it afresh. A
  slot with a wrong seq stops the drain once and is faulted on the next look, because on a
  weakly ordered CPU it may be a slot still in flight (see `sdk.ring.write_slot`).
- Every fault counts; at `max_faults` the ring is quarantined and yields nothing more, while
  other agents' rings go on untouched.
- Work per drain is bounded by `max_n` so one agent cannot monopolise the kernel loop.

Doorbells are eventfds: the kernel polls the submission doorbell's fd beside its ROUTER socket,
calls `acknowledge()` then `drain()`. One doorbell covers any number of entries (an agent
publishes a batch, then rings once, like io_uring_enter). Under load the loop may also drain
rings that saw recent traffic on every iteration without waiting for their doorbells; a doorbell
rung meanwhile is redundant but harmless. While it polls a ring it sets the ring's POLLING flag,
so the agent skips the doorbell (`sdk.ring`); it rings the agent's completion doorbell only
when the agent's flag says it is not looking. Semaphores were measured as the alternative and lost:
they have no fd, so the loop could only wait on them through a thread per agent.
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import mmap
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import posix_ipc

from sdk.ring import (
    ADVICE_WORD,
    COUNTER_MASK,
    FLAGS_WORD,
    HEAD_WORD,
    HEADER_BYTES,
    POLLING,
    SLOT_HEADER_BYTES,
    TAIL_WORD,
    Buffer,
    Geometry,
    RingError,
    RingSpec,
    RingView,
    fence,
    format_ring,
    write_slot,
)

DEFAULT_MAX_FAULTS = 8

__all__ = ["DEFAULT_MAX_FAULTS", "CompletionProducer", "FaultKind", "RingError", "RingFault",
           "RingPair", "SubmissionConsumer"]


class FaultKind(enum.Enum):
    TAIL = "tail"  # the SQ tail claims more than `capacity` entries past the head (or went back)
    HEAD = "head"  # the CQ head is not within `capacity` entries behind the kernel's tail
    SEQ = "seq"  # a published slot whose seq word is not its position + 1
    LENGTH = "length"  # a slot claiming more payload than a slot holds
    PAYLOAD = "payload"  # a well-framed entry whose bytes are not a valid request


@dataclass(frozen=True, slots=True)
class RingFault:
    """One malformed thing found in an agent's ring; the offending entry has been skipped.

    `data` is the entry's claimed payload, cut to what a slot holds: untrusted bytes kept so
    the kernel can try to recover a request id and answer it with EINVAL. It is empty when there
    is nothing to keep (a bad counter, a slot that was never written this lap).
    """

    kind: FaultKind
    position: int  # ring counter of the entry, or the kernel's own counter for TAIL/HEAD
    detail: str
    data: bytes = b""


class _Ring:
    """Geometry, the mapped view and the fault accounting shared by the kernel's two ends."""

    def __init__(self, buf: Buffer, capacity: int, slot_size: int, max_faults: int) -> None:
        if max_faults < 1:
            raise RingError(f"max_faults must be at least 1, not {max_faults}")
        self.geometry = Geometry(capacity, slot_size)
        self.max_faults = max_faults
        self.faults = 0
        self.last_fault: RingFault | None = None
        self._view: RingView | None = RingView(buf, self.geometry)

    @property
    def quarantined(self) -> bool:
        return self.faults >= self.max_faults

    def _open_view(self) -> RingView:
        if self._view is None:
            raise RingError("ring is closed")
        return self._view

    def _fault(self, kind: FaultKind, position: int, detail: str,
               data: bytes = b"") -> RingFault:
        fault = RingFault(kind, position, detail, data)
        self.faults += 1
        self.last_fault = fault
        return fault

    def release(self) -> None:
        """Let go of the mapping (before it is unmapped); later use raises RingError."""
        if self._view is not None:
            self._view.release()
            self._view = None


class SubmissionConsumer(_Ring):
    """The kernel's end of an agent's submission ring: it owns the head."""

    def __init__(self, buf: Buffer, capacity: int, slot_size: int, *,
                 max_faults: int = DEFAULT_MAX_FAULTS, start: int = 0) -> None:
        super().__init__(buf, capacity, slot_size, max_faults)
        # Kernel memory only: the head in the segment is written for the agent, never read.
        self._head = start & COUNTER_MASK
        # A slot whose seq was wrong on the last look, given one more drain to become visible.
        self._suspect: int | None = None

    def pending(self) -> bool:
        """A peek: whether the agent's tail has moved past the head (drain decides what it
        means). False once quarantined or closed."""
        view = self._view
        return view is not None and not self.quarantined and view.words[TAIL_WORD] != self._head

    def set_polling(self, polling: bool) -> None:
        """Tell the agent whether the kernel is polling this ring (then it need not ring)."""
        if self._view is not None:
            self._view.words[FLAGS_WORD] = POLLING if polling else 0

    def drain(self, max_n: int = 64) -> tuple[list[bytes], list[RingFault]]:
        """Take up to `max_n` entries: the valid payloads in order, and a fault for each entry
        skipped. Nothing once quarantined. Raises only RingError, and only when closed."""
        view = self._open_view()
        if self.quarantined or max_n <= 0:
            return [], []
        geo = self.geometry
        mem = view.mem
        head = self._head
        tail = view.words[TAIL_WORD]  # the one read of the agent's counter
        available = (tail - head) & COUNTER_MASK
        if available > geo.capacity:
            return [], [self._fault(FaultKind.TAIL, head,
                                    f"tail {tail} is {available} entries past head {head}")]
        payloads: list[bytes] = []
        faults: list[RingFault] = []
        limit = geo.payload_capacity
        words = view.words
        for _ in range(min(available, max_n)):
            offset = HEADER_BYTES + (head & geo.mask) * geo.slot_size
            # The one read of each part of the slot: seq and length into locals, then the
            # payload bytes (the length checked first) into a private copy.
            seq, length = words[offset >> 2], words[(offset >> 2) + 1]
            start = offset + SLOT_HEADER_BYTES
            if seq != (head + 1) & COUNTER_MASK:
                if self._suspect != head:
                    # Tail visible before the slot is possible on weakly ordered CPUs when the
                    # loop polls without a doorbell: look once more before calling it a fault.
                    self._suspect = head
                    break
                never_written = seq == (head + 1 - geo.capacity) & COUNTER_MASK
                faults.append(self._fault(
                    FaultKind.SEQ, head, f"seq {seq} in slot of entry {head}",
                    b"" if never_written else bytes(mem[start:start + min(length, limit)])))
            elif length > limit:
                faults.append(self._fault(FaultKind.LENGTH, head,
                                          f"length {length} > {limit} in entry {head}",
                                          bytes(mem[start:start + limit])))
            else:
                payloads.append(bytes(mem[start:start + length]))
            self._suspect = None
            head = (head + 1) & COUNTER_MASK
            if self.quarantined:
                break
        if head != self._head:
            self._head = head
            # After the copies: the agent may now reuse those slots.
            view.words[HEAD_WORD] = head
        return payloads, faults

    def charge(self, detail: str) -> RingFault:
        """Count a fault found past the framing (an entry that does not decode), against the
        entry just drained."""
        return self._fault(FaultKind.PAYLOAD, (self._head - 1) & COUNTER_MASK, detail)


class CompletionProducer(_Ring):
    """The kernel's end of an agent's completion ring: it owns the tail. Never blocks."""

    def __init__(self, buf: Buffer, capacity: int, slot_size: int, *,
                 max_faults: int = DEFAULT_MAX_FAULTS, start: int = 0) -> None:
        super().__init__(buf, capacity, slot_size, max_faults)
        self._tail = start & COUNTER_MASK

    def advise(self, spin_us: int) -> None:
        """Tell the agent how long to spin for completions before sleeping (0: don't)."""
        view = self._view
        if view is not None:
            view.words[ADVICE_WORD] = spin_us

    def consumer_polling(self) -> bool:
        """Whether the agent says it is looking at the ring (no doorbell needed). An untrusted
        word: a lying agent only loses its own wakeups."""
        view = self._view
        return view is not None and view.words[FLAGS_WORD] == POLLING

    def push(self, payload: bytes) -> bool:
        """Publish one completion; False when the agent is not consuming (ring full), the
        payload does not fit a slot, or the ring is quarantined: send it over ZeroMQ then."""
        return self.push_many((payload,)) == 1

    def push_many(self, payloads: Iterable[bytes]) -> int:
        """Publish completions in order up to the first that does not fit; one tail store.
        Ring the agent's doorbell afterwards (`RingPair.complete` does both)."""
        view = self._open_view()
        if self.quarantined:
            return 0
        geo = self.geometry
        head = view.words[HEAD_WORD]  # the one read of the agent's counter
        used = (self._tail - head) & COUNTER_MASK
        if used > geo.capacity:
            self._fault(FaultKind.HEAD, self._tail,
                        f"head {head} is not within {geo.capacity} entries of tail {self._tail}")
            return 0
        room = geo.capacity - used
        tail = self._tail
        n = 0
        for payload in payloads:
            if n == room or len(payload) > geo.payload_capacity:
                break
            write_slot(view, HEADER_BYTES + (tail & geo.mask) * geo.slot_size, tail, payload)
            tail = (tail + 1) & COUNTER_MASK
            n += 1
        if n:
            self._tail = tail
            view.words[TAIL_WORD] = tail
        return n


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)


def map_shared(fd: int, size: int) -> mmap.mmap:
    """A shared read-write mapping of `fd` that holds no fd of its own. `mmap.mmap(fd)` keeps a
    dup of `fd` as long as the mapping lives (until Python 3.13's `trackfd=False`): two per
    agent's rings, which is what ran a kernel of 2,000 agents out of RLIMIT_NOFILE. Here Python
    maps anonymous memory of the size (no fd) and the segment's pages replace it at the same
    address (MAP_FIXED, atomic): the object is an ordinary mmap (bounds-checked, unmapped by
    `close`, ValueError once closed) over the segment."""
    segment = mmap.mmap(-1, size)
    try:
        view = (ctypes.c_char * size).from_buffer(segment)
        address = ctypes.addressof(view)
        del view  # no export left, so `close` can unmap it later
        got = _libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_SHARED | 0x10, fd, 0)  # 0x10: MAP_FIXED
        if got != address:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of a ring segment: {os.strerror(err)}")
    except BaseException:
        segment.close()
        raise
    return segment


@dataclass
class _Segment:
    """One mapped ring segment and the fd behind it."""

    fd: int
    map: mmap.mmap
    name: str | None  # its /dev/shm name while linked; memfds never have one

    @classmethod
    def create(cls, role: str, geometry: Geometry, owner_uid: int | None,
               named: bool) -> _Segment:
        name = None
        if named:
            name = f"/agentos-{secrets.token_hex(16)}"
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=geometry.size)
            fd = shm.fd
        else:
            fd = os.memfd_create(f"agentos-{role}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            if not named:
                os.ftruncate(fd, geometry.size)
                # Sealed against resizing: an agent holding the fd could otherwise shrink the
                # segment under the kernel's mapping, and the kernel's next touch past the new
                # end is SIGBUS, which kills it. POSIX shm cannot be sealed (EPERM).
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            os.fchmod(fd, 0o600)  # shm_open applies the umask; a memfd starts at 0777
            if owner_uid is not None:
                os.fchown(fd, owner_uid, -1)
            segment_map = map_shared(fd, geometry.size)
        except BaseException:
            os.close(fd)
            if name is not None:
                posix_ipc.unlink_shared_memory(name)
            raise
        format_ring(segment_map, geometry, zeroed=True)  # new memfds and shm objects read as 0
        return cls(fd, segment_map, name)

    def unlink(self) -> None:
        if self.name is not None:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass  # someone with the name removed it first; the mapping lives on
            self.name = None

    def close(self) -> None:
        self.map.close()
        self.unlink()
        self.release_fd()

    def release_fd(self) -> None:
        """Close the fd (the mapping keeps the segment, and holds no fd: `map_shared`)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RingPair:
    """One agent's submission and completion rings, their segments and their doorbells.

    Two ways to hand them to an agent:
    - spawned agents (the default, `named=False`): the segments are sealed memfds that never
      have a name; pass `fds()` to `subprocess.Popen(pass_fds=...)` and `spec()` to the agent.
    - agents that connect on their own (`named=True`): the segments are POSIX shm objects with
      unguessable names, mode 0600, owned by `owner_uid`. Give the agent `spec()` over its
      authenticated connection and `unlink()` once it reports them mapped. POSIX shm cannot be
      sealed, so such an agent could truncate a segment and crash the kernel with SIGBUS: use
      this form only for agents trusted not to, and the fd form for sandboxed ones.
    """

    def __init__(self, geometry: Geometry, segments: tuple[_Segment, _Segment],
                 doorbells: tuple[int, int], named: bool, max_faults: int) -> None:
        self.geometry = geometry
        self.named = named
        self._segments = segments
        self._doorbells = doorbells
        self._closed = False
        self.submissions = SubmissionConsumer(segments[0].map, geometry.capacity,
                                              geometry.slot_size, max_faults=max_faults)
        self.completions = CompletionProducer(segments[1].map, geometry.capacity,
                                              geometry.slot_size, max_faults=max_faults)

    @classmethod
    def create(cls, capacity: int = 256, slot_size: int = 512, owner_uid: int | None = None,
               *, named: bool = False, max_faults: int = DEFAULT_MAX_FAULTS) -> RingPair:
        geometry = Geometry(capacity, slot_size)
        if max_faults < 1:
            raise RingError(f"max_faults must be at least 1, not {max_faults}")
        segments: list[_Segment] = []
        doorbells: list[int] = []
        try:
            for role in ("sq", "cq"):
                segments.append(_Segment.create(role, geometry, owner_uid, named))
            for _ in range(2):
                doorbells.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        except (OSError, posix_ipc.Error) as exc:
            for segment in segments:
                segment.close()
            for fd in doorbells:
                os.close(fd)
            raise RingError(f"cannot create rings: {exc}") from None
        return cls(geometry, (segments[0], segments[1]), (doorbells[0], doorbells[1]), named,
                   max_faults)

    # --- doorbells ---------------------------------------------------------------------------

    def _fd(self, fd: int) -> int:
        # A closed pair's fd numbers may already belong to someone else's file.
        if self._closed:
            raise RingError("ring pair is closed")
        return fd

    @property
    def submission_doorbell(self) -> int:
        """The eventfd the agent rings; poll it for POLLIN beside the ROUTER socket."""
        return self._fd(self._doorbells[0])

    def acknowledge(self) -> int:
        """Clear the submission doorbell, before draining, so a ring that comes in during the
        drain is kept for the next poll. Returns the count the agent rang (0 if none)."""
        try:
            return os.eventfd_read(self._fd(self._doorbells[0]))
        except BlockingIOError:
            return 0

    def notify(self) -> None:
        """Ring the agent's completion doorbell; never blocks."""
        try:
            os.eventfd_write(self._fd(self._doorbells[1]), 1)
        except BlockingIOError:
            pass  # the agent saturated its own counter: it has a wakeup pending regardless

    def drain(self, max_n: int = 64) -> tuple[list[bytes], list[RingFault]]:
        return self.submissions.drain(max_n)

    def complete(self, payloads: Iterable[bytes]) -> int:
        """Publish completions and ring the agent once for all of them; returns how many were
        published (the rest go over ZeroMQ)."""
        n = self.completions.push_many(payloads)
        if n:
            fence()  # the tail store before the flags load (see sdk.ring)
            if not self.completions.consumer_polling():
                self.notify()
        return n

    @property
    def quarantined(self) -> bool:
        return self.submissions.quarantined or self.completions.quarantined

    # --- handing the rings to an agent -------------------------------------------------------

    def fds(self) -> tuple[int, int, int, int]:
        """SQ segment, CQ segment, SQ doorbell, CQ doorbell: for `Popen(pass_fds=...)`, which
        keeps their numbers in the child, so `spec()` is valid there as it stands."""
        sq, cq = self._segments
        if sq.fd < 0 or cq.fd < 0:
            raise RingError("the segments were handed over already")
        return (self._fd(sq.fd), cq.fd, *self._doorbells)

    def handed_over(self) -> None:
        """The agent holds the segments now: the kernel keeps its mappings, not the fds it
        passed (an fd per segment per agent is what runs a kernel of thousands of agents out
        of RLIMIT_NOFILE). `fds()` and `spec()` of memfd segments are void from here on."""
        if not self.named:
            for segment in self._segments:
                segment.release_fd()

    def spec(self) -> RingSpec:
        """What the agent attaches with (`sdk.ring.AgentRings.attach`)."""
        geo = self.geometry
        sq, cq = self._segments
        if not self.named:
            if sq.fd < 0 or cq.fd < 0:
                raise RingError("the segments were handed over already")
            return RingSpec(geo.capacity, geo.slot_size, self._fd(sq.fd), cq.fd,
                            *self._doorbells)
        if sq.name is None or cq.name is None:
            raise RingError("the segments' names are already unlinked")
        return RingSpec(geo.capacity, geo.slot_size, sq.name, cq.name)

    @property
    def names(self) -> tuple[str, ...]:
        """The segments' names still linked in /dev/shm."""
        return tuple(s.name for s in self._segments if s.name is not None)

    def unlink(self) -> None:
        """Remove the names; the mappings (the kernel's and the agent's) live on."""
        for segment in self._segments:
            segment.unlink()

    def close(self) -> None:
        """Unmap, unlink whatever is still linked, close every fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.submissions.release()
        self.completions.release()
        for segment in self._segments:
            segment.close()
        for fd in self._doorbells:
            os.close(fd)

    def __enter__(self) -> RingPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
