"""Per-resource locks for tool calls: readers share, writers are alone, first come first served.

Owned by the dispatch loop (no threads touch it). A call asks for all its resources at once and
is granted them together, so two calls never hold one each of what the other wants. Waiters
are served in arrival order: a call is granted only when it conflicts neither with a holder nor
with an earlier waiter, so a stream of readers cannot starve a writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Request:
    keys: tuple[str, ...]
    exclusive: bool
    grant: Callable[[], None]
    held: bool = False
    dropped: bool = False


@dataclass
class _Holders:
    readers: int = 0
    writer: bool = False


@dataclass
class ResourceLocks:
    _holders: dict[str, _Holders] = field(default_factory=dict)
    _waiting: list[Request] = field(default_factory=list)

    def acquire(self, keys: tuple[str, ...], exclusive: bool,
                grant: Callable[[], None]) -> Request:
        """Ask for `keys`; `grant` runs once they are held (maybe before this returns)."""
        req = Request(tuple(sorted(set(keys))), exclusive, grant)
        self._waiting.append(req)
        self._pump()
        return req

    def release(self, req: Request) -> None:
        """Give back what `req` holds, or withdraw it if it is still waiting."""
        if req.dropped:
            return
        req.dropped = True
        if not req.held:
            self._waiting.remove(req)
        else:
            for key in req.keys:
                h = self._holders[key]
                if req.exclusive:
                    h.writer = False
                else:
                    h.readers -= 1
                if not h.writer and not h.readers:
                    del self._holders[key]
        self._pump()

    def waiting(self) -> int:
        return len(self._waiting)

    def _free(self, req: Request) -> bool:
        for key in req.keys:
            h = self._holders.get(key)
            if h is not None and (h.writer or (req.exclusive and h.readers)):
                return False
        return True

    def _pump(self) -> None:
        granted: list[Request] = []
        ahead: list[Request] = []  # earlier waiters still waiting: later ones may not pass them
        for req in self._waiting:
            if self._free(req) and not any(_conflict(req, a) for a in ahead):
                for key in req.keys:
                    h = self._holders.setdefault(key, _Holders())
                    if req.exclusive:
                        h.writer = True
                    else:
                        h.readers += 1
                req.held = True
                granted.append(req)
            else:
                ahead.append(req)
        self._waiting = ahead
        for req in granted:
            req.grant()


def _conflict(a: Request, b: Request) -> bool:
    return (a.exclusive or b.exclusive) and not set(a.keys).isdisjoint(b.keys)
