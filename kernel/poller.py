"""The dispatch loop's poller: zmq.Poller's interface, at a cost that does not grow with agents.

`zmq.Poller.poll` hands libzmq every registered item on every call: with 2,000 agents (a ring
doorbell, a pidfd and a log pipe each) that is ~6,000 fds walked per wait, 0.3 ms a poll on
this machine, paid several times per syscall while the loop spins on busy rings. Here only the
ZeroMQ sockets (a handful) go to zmq_poll; every plain fd is in one epoll set, whose own fd is
one more item of that poll, and a ready epoll set is asked for its ready fds alone.

Registration is by fd number, as in zmq.Poller. Unregister an fd before closing it: epoll
watches the open file, not the number, and a doorbell the agent also holds would stay in the
set after the kernel's close (its events would then arrive under a number that may be reused).
Events for a number no longer registered are dropped.
"""

from __future__ import annotations

import select
from typing import Any

import zmq

_MAX_EVENTS = 4096  # ready fds taken per wait; the rest stay ready for the next (level-triggered)


def _to_epoll(flags: int) -> int:
    events = 0
    if flags & zmq.POLLIN:
        events |= select.EPOLLIN
    if flags & zmq.POLLOUT:
        events |= select.EPOLLOUT
    return events


def _from_epoll(events: int) -> int:
    """epoll's bits as zmq_poll reports a plain fd's: anything but in/out (HUP, ERR) is
    POLLERR, as libzmq maps poll(2)'s revents."""
    flags = 0
    if events & select.EPOLLIN:
        flags |= zmq.POLLIN
    if events & select.EPOLLOUT:
        flags |= zmq.POLLOUT
    if events & ~(select.EPOLLIN | select.EPOLLOUT | select.EPOLLPRI):
        flags |= zmq.POLLERR
    return flags


class Poller:
    def __init__(self) -> None:
        self._sockets = zmq.Poller()
        self._epoll = select.epoll()
        self._fds: dict[int, int] = {}  # fd -> zmq flags asked for
        self._sockets.register(self._epoll.fileno(), zmq.POLLIN)

    def register(self, target: Any, flags: int = zmq.POLLIN | zmq.POLLOUT) -> None:
        """Watch `target` (a ZeroMQ socket or an fd number) for `flags`; 0 unregisters it, and
        registering again changes its flags."""
        if not isinstance(target, int):
            self._sockets.register(target, flags)
            return
        if not flags:
            if target in self._fds:
                self.unregister(target)
            return
        if target in self._fds:
            self._epoll.modify(target, _to_epoll(flags))
        else:
            self._epoll.register(target, _to_epoll(flags))
        self._fds[target] = flags

    def unregister(self, target: Any) -> None:
        """Stop watching `target`; KeyError if it was not watched (as zmq.Poller)."""
        if not isinstance(target, int):
            self._sockets.unregister(target)
            return
        del self._fds[target]
        try:
            self._epoll.unregister(target)
        except OSError:
            pass  # closed already (EBADF): its open file left the set with its last fd

    def poll(self, timeout: int | None = None) -> list[tuple[Any, int]]:
        """(target, events) for each ready target, waiting up to `timeout` ms (None: forever;
        0: not at all)."""
        ready = []
        for target, events in self._sockets.poll(timeout):
            if target != self._epoll.fileno():
                ready.append((target, events))
                continue
            for fd, got in self._epoll.poll(0, _MAX_EVENTS):
                if fd in self._fds:
                    ready.append((fd, _from_epoll(got)))
        return ready

    def close(self) -> None:
        self._sockets.unregister(self._epoll.fileno())
        self._epoll.close()
        self._fds.clear()

    def __len__(self) -> int:
        return len(self._fds) + len(self._sockets.sockets) - 1
