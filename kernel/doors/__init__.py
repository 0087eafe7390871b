"""The kernel's doors: where calls come in as bytes (or structs) and their replies go out.

A door turns what arrives into calls (`Kernel.submit` for request bytes, `Kernel.execute` for
a struct made in-process) and delivers each call's outcome back the way it came; it knows no
manager. Each one is a `Door`: the loop calls `on_ready` with what its poll found, `deliver`
for each reply on a route of the door's `routes` type, `flush` once a batch is delivered, and
`close` at shutdown. A door registers what it polls (sockets, fds) on the kernel's poller
itself, since some come and go (an agent's rings).

- router.py: the ZeroMQ ROUTER on the state dir's ipc:// socket (peers attested by ZAP)
- rings.py (ring.py, ringdoor.py): per-agent submission/completion rings in shared memory
- remote.py: tcp:// with CurveZMQ for agents on other machines
- http/: the OpenAI-compatible and AIOS HTTP front end
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The loop's batch: messages taken from one door per loop iteration, at most ...
BATCH = 256
# ... and for at most this long: a flood of messages (however cheap or costly each) delays the
# other doors by about this, so a neighbour's call waits a loop iteration, not 256 of a
# hostile agent's calls.
DOOR_BUDGET_S = 0.002


class Door:
    """Base of the doors. Its no-op `on_ready` and `flush` are what a door without sockets of
    the loop's or without anything to publish inherits; the loop calls only the doors that
    override them (`Kernel._open_door`), since it runs both for every batch."""

    # The route type of the calls that came in through this door (a bytes subclass; plain
    # bytes for the ROUTER's): the loop delivers a reply to the door of its route's type.
    # None for a door that takes no calls of its own (the ring door only hands out rings).
    routes: type[bytes] | None = None

    def on_ready(self, ready: Mapping[Any, int]) -> None:
        """Take what arrived on the sockets and fds in `ready` that are this door's."""

    def deliver(self, route: bytes, reply: Any) -> None:
        """Send one reply frame (bytes; a struct for an in-process route) back on `route`."""
        raise NotImplementedError(f"{type(self).__name__} takes no calls")

    def flush(self) -> None:
        """The batch's replies are all delivered: publish them (one doorbell per ring)."""

    def close(self) -> None:
        """Stop taking calls and release what the door holds."""

    @classmethod
    def overrides(cls, method: str) -> bool:
        """Whether this door does something in `method` (the loop skips the no-ops)."""
        return getattr(cls, method) is not getattr(Door, method)
