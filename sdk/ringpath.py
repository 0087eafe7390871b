"""The SDK's ring path: claiming the rings the kernel gave this agent, and the completion framing.

A spawned agent inherits its two rings and their doorbells as fds, described by a `RingSpec`
in `$AGENTOS_RINGS`. The process that imports the SDK takes them: it removes the variable
from its environment and makes the fds close-on-exec, so programs it runs never see them.
One connection at a time in that process uses them (two producers on one ring would corrupt
it); others, and forked children, use ZeroMQ. The request ids of every connection that uses
the rings come from one counter, so a late reply to an abandoned call can never be taken for
a newer call's.

Completions are msgpack `Reply`/`Error`/`Chunk` frames, one per slot. One larger than a slot
is cut into fragments: entries starting with 0xC1 (a byte msgpack never uses, so no whole
frame starts with it), then a flag (0: more follow, 1: last), then the next piece.
"""

from __future__ import annotations

import itertools
import os
import socket

import msgspec

from sdk import layout
from sdk.ring import AgentRings, RingError, RingSpec

FRAGMENT = 0xC1
_MORE, _LAST = 0, 1


def _spin_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("AGENTOS_RING_SPIN_US", "100"))) / 1e6
    except ValueError:
        return 1e-4


# How long a blocking call waits for its completion by looking at the ring before it sleeps on
# the doorbell (AGENTOS_RING_SPIN_US, default 100 µs; 0 always sleeps). Waking a sleeping
# process costs tens of microseconds on a VM, more than most syscalls take in the kernel.
SPIN_S = _spin_seconds()
# ... and up to this long while the kernel is polling the agent's rings (awake, working on them).
BUSY_SPIN_S = 20 * SPIN_S


def encode_spec(spec: RingSpec) -> str:
    return msgspec.json.encode(spec).decode()


def fragments(frame: bytes, limit: int) -> list[bytes]:
    """`frame` as ring entries of at most `limit` bytes each."""
    if len(frame) <= limit:
        return [frame]
    step = limit - 2
    return [bytes((FRAGMENT, _LAST if i + step >= len(frame) else _MORE)) + frame[i:i + step]
            for i in range(0, len(frame), step)]


class RingChannel:
    """This process's rings, as one connection uses them."""

    def __init__(self, rings: AgentRings, ids: itertools.count[int],
                 owned: tuple[int, ...] = (), lifeline: socket.socket | None = None) -> None:
        self.rings = rings
        self.ids = ids
        self.limit = rings.geometry.payload_capacity
        assert rings.completion_doorbell is not None
        self.doorbell = rings.completion_doorbell
        self._parts: list[bytes] = []
        self._owned = owned  # fds this channel received and closes (rings by ticket)
        self._lifeline = lifeline  # its end closes the rings in the kernel

    def close(self) -> None:
        self.rings.close()
        for fd in self._owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned = ()
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None

    def push(self, data: bytes) -> bool:
        """Publish one request without ringing; False if it does not fit or the ring is full."""
        return self.rings.submissions.push(data)

    def ring(self) -> None:
        """Wake the kernel for what was pushed, unless it is polling this ring."""
        self.rings.ring_doorbell()

    def spin(self) -> bool:
        """Busy-look for completions before sleeping (see `AgentRings.spin`)."""
        return self.rings.spin(SPIN_S, BUSY_SPIN_S)

    def clear(self) -> None:
        """Reset the completion doorbell; call before `completions`, so none is missed."""
        try:
            os.eventfd_read(self.doorbell)
        except BlockingIOError:
            pass

    def completions(self) -> list[bytes]:
        """Every whole frame published so far, fragments joined."""
        out: list[bytes] = []
        while True:
            entries = self.rings.completions.pop_many(256)
            if not entries:
                return out
            for entry in entries:
                if entry[:1] != b"\xc1":
                    self._parts.clear()
                    out.append(entry)
                    continue
                self._parts.append(entry[2:])
                if entry[1:2] == b"\x01":
                    out.append(b"".join(self._parts))
                    self._parts.clear()


class _Claim:
    """The rings this process inherited, and who uses them now."""

    def __init__(self) -> None:
        self.spec: RingSpec | None = None
        self.endpoint: str | None = None
        self.ids = itertools.count(1)
        self.user: RingChannel | None = None
        text = os.environ.pop(layout.ENV_RINGS, None)
        if not text:
            return
        try:
            self.spec = msgspec.json.decode(text, type=RingSpec)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self.endpoint = os.environ.get(layout.ENV_ENDPOINT)
        for fd in (self.spec.submission, self.spec.completion, self.spec.submission_doorbell,
                   self.spec.completion_doorbell):
            if isinstance(fd, int):
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass  # not open: attach will fail and the process use ZeroMQ


_claim = _Claim()


def disable() -> None:
    """Use ZeroMQ only from now on in this process (for tests and benchmarks that compare)."""
    _claim.spec = None


os.register_at_fork(after_in_child=disable)  # a forked child must not be a second producer


def claim(endpoint: str) -> RingChannel | None:
    """The rings for a new connection to `endpoint`, or None: use ZeroMQ only."""
    c = _claim
    if c.spec is None or c.user is not None or endpoint != c.endpoint:
        return None
    try:
        rings = AgentRings.attach(c.spec)
    except RingError:
        c.spec = None  # not ours after all (fds closed by the agent): never try again
        return None
    c.user = RingChannel(rings, c.ids)
    return c.user


def release(channel: RingChannel) -> None:
    """The connection is closing: unmap, and let a later connection claim the rings again."""
    channel.close()
    if _claim.user is channel:
        _claim.user = None


class _Geometry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    capacity: int
    slot_size: int


def attach_ticket(path: str, ticket: str, ids: itertools.count[int],
                  timeout: float = 5.0) -> RingChannel:
    """Claim the rings a `sys.rings` ticket names (kernel/doors/ringdoor.py): present it on the
    kernel's Unix socket, receive the four fds, map them. The socket stays open as the rings'
    lifeline. Raises RingError (or OSError) when that fails; the caller then uses ZeroMQ."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(ticket.encode("ascii") + b"\n")
        head, fds, _, _ = socket.recv_fds(sock, 1024, 4)
        if len(fds) != 4 or not head:
            raise RingError("the kernel refused the ring ticket")
        for fd in fds:
            os.set_inheritable(fd, False)
        geometry = msgspec.json.decode(head, type=_Geometry)
        spec = RingSpec(geometry.capacity, geometry.slot_size, *fds)
        rings = AgentRings.attach(spec)
    except BaseException:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise
    return RingChannel(rings, ids, owned=tuple(fds), lifeline=sock)
