"""Syscall rings for processes that connect on their own: a ticket over ZeroMQ, the rings' fds
over a Unix socket.

A spawned agent inherits its rings at exec. A user's own process (principal `user:<uid>`) asks
for them with `sys.rings`: the kernel makes a pair (sealed memfds and eventfd doorbells, as for
agents) and answers with a one-time ticket and the path of `run/rings.sock`. The process
connects there and sends the ticket; the kernel checks the connection's SO_PEERCRED uid against
the ticket's and sends the four fds with SCM_RIGHTS. Passing fds rather than naming POSIX shm
objects keeps the segments sealed: a named segment could be truncated by its user under the
kernel's mapping, and the kernel's next touch would be a SIGBUS. The Unix connection stays open
for as long as the process uses the rings: its end (close, exit or SIGKILL) closes them.
Unclaimed tickets expire after TICKET_TTL_S.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from kernel.call import Call, Fault
from kernel.doors import Door
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Kernel
    from kernel.doors.rings import AgentRing

log = logging.getLogger("kernel.doors.rings")

TICKET_TTL_S = 10.0
MAX_USER_RINGS = 64  # pairs held by users' processes at once, kernel-wide
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass
class _Ticket:
    ring: AgentRing
    uid: int
    expires: float


class RingDoor(Door):
    """A door (kernel/doors/__init__.py) that takes no calls of its own: it hands out rings,
    whose calls come in and go out through `Rings`."""

    routes = None

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.path = kernel.state.run / "rings.sock"
        self.listener: socket.socket | None = None
        self._tickets: dict[str, _Ticket] = {}
        self._conns: dict[int, tuple[socket.socket, AgentRing | None]] = {}

    def open(self) -> None:
        try:
            os.unlink(self.path)  # a stale socket of a crashed kernel; we hold the state lock
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX,
                                 socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)  # who may connect: as for the kernel's own socket
        listener.listen(64)
        self.listener = listener
        self.k.poller.register(listener.fileno(), zmq.POLLIN)

    def close(self) -> None:
        for fd in list(self._conns):
            self._hang_up(fd)
        for ticket in self._tickets.values():
            self.k.rings.close_ring(ticket.ring)
        self._tickets.clear()
        if self.listener is not None:
            self.k.poller.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    @property
    def held(self) -> int:
        """Pairs made for users' processes and not yet closed (claimed or waiting)."""
        return len(self._tickets) + sum(ring is not None for _, ring in self._conns.values())

    # --- the syscall -------------------------------------------------------------------------

    def issue(self, call: Call) -> abi.RingTicket:
        """`sys.rings`: a pair for the calling user's process, and the ticket that claims it."""
        kind, _, ident = call.caller.principal.partition(":")
        if kind != "user" or not ident.isdigit():
            raise Fault(abi.ErrorCode.EPERM, "rings by ticket are for users' own processes; "
                        "agents get theirs when they are spawned")
        if not self.k.config.rings or self.listener is None:
            raise Fault(abi.ErrorCode.ENOSYS, "syscall rings are off in this kernel")
        if self.held >= MAX_USER_RINGS:
            raise Fault(abi.ErrorCode.EAGAIN, f"{MAX_USER_RINGS} ring pairs are held by users' "
                        "processes already")
        ring = self.k.rings.make(call.caller.principal)
        if ring is None:
            raise Fault(abi.ErrorCode.EAGAIN, "cannot create rings now")
        ticket = secrets.token_hex(16)
        self._tickets[ticket] = _Ticket(ring, int(ident), time.monotonic() + TICKET_TTL_S)
        self.k.calls.after(TICKET_TTL_S, lambda: self._expire(ticket))
        return abi.RingTicket(ticket=ticket, path=str(self.path))

    def _expire(self, ticket: str) -> None:
        held = self._tickets.pop(ticket, None)
        if held is not None:
            self.k.rings.close_ring(held.ring)

    # --- the Unix socket ---------------------------------------------------------------------

    def on_ready(self, ready: Mapping[Any, int]) -> None:
        listener = self.listener
        if listener is not None and listener.fileno() in ready:
            self._accept(listener)
        for fd in [fd for fd in ready if isinstance(fd, int) and fd in self._conns]:
            try:
                self._on_conn(fd)
            except Exception:  # never the loop's end: this one connection goes
                log.exception("rings.sock connection failed")
                if fd in self._conns:
                    self._hang_up(fd)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: refuse this one, keep serving
                log.warning("rings.sock accept failed", extra={"error": str(exc)})
                return
            if len(self._conns) >= 2 * MAX_USER_RINGS:  # idle connections cost the kernel fds
                conn.close()
                self.k.calls.errors["ring.door_full"] += 1
                continue
            conn.setblocking(False)
            self._conns[conn.fileno()] = (conn, None)
            self.k.poller.register(conn.fileno(), zmq.POLLIN)

    def _on_conn(self, fd: int) -> None:
        conn, ring = self._conns[fd]
        try:
            data = conn.recv(128)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or ring is not None:  # the process is gone (or says more than it may)
            self._hang_up(fd)
            return
        text = data.decode("ascii", errors="replace").strip()
        held = self._tickets.pop(text, None)
        try:
            _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         _PEERCRED.size))
        except OSError:
            uid = -1
        if held is None or held.uid != uid:
            self.k.calls.errors["ring.bad_ticket"] += 1
            log.warning("rings.sock: refused a ticket", extra={"uid": uid,
                                                               "known": held is not None})
            if held is not None:  # presented by another uid: it is spent, its rings go
                self.k.rings.close_ring(held.ring)
            self._hang_up(fd)
            return
        geometry = held.ring.pair.geometry
        head = msgspec.json.encode({"capacity": geometry.capacity,
                                    "slot_size": geometry.slot_size})
        try:
            socket.send_fds(conn, [head], list(held.ring.pair.fds()))
        except OSError:
            self.k.rings.close_ring(held.ring)
            self._hang_up(fd)
            return
        self._conns[fd] = (conn, held.ring)
        self.k.calls.counts["ring.user_attached"] += 1

    def _hang_up(self, fd: int) -> None:
        conn, ring = self._conns.pop(fd)
        self.k.poller.unregister(fd)
        conn.close()
        if ring is not None:
            self.k.rings.close_ring(ring)
