"""The in-sandbox bridge: loopback TCP listeners inside the agent's network namespace whose
connections are relayed, byte for byte, to Unix sockets the kernel serves (the agent's HTTP
door, its egress proxy).

The launcher binds the listeners as root in the agent's fresh namespace, before Landlock and
seccomp, then forks this relay after every layer is applied: it runs as the agent, under the
agent's restrictions, and holds nothing the agent does not (the agent may connect to the same
Unix sockets itself). It is what lets an unmodified client that only speaks TCP
(`OPENAI_BASE_URL=http://127.0.0.1:PORT/v1`) reach the kernel with no TCP to the host: the
namespace has only its own loopback. One thread, non-blocking sockets, bounded buffers; the
stdlib only (the launcher starts with `-I -S`).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket

PORTS = {"door": 8080, "proxy": 3128}  # inside the agent's own namespace: the same for all
CHUNK = 64 * 1024
MAX_PAIRS = 64  # the kernel bounds connections per agent too; this bounds the relay's fds


def loopback_up() -> None:
    """Bring up `lo` in this (fresh) network namespace: the standard tier's unshare leaves it
    down (bubblewrap brings it up itself)."""
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, ifreq))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def listen(port: int) -> socket.socket:
    """A listener on 127.0.0.1:`port` (made as root, before the namespace's rules apply)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    s.setblocking(False)
    return s


class _Side:
    """One socket of a relayed pair and the bytes waiting to be written to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.peer: _Side = self
        self.reading = True  # False once it sent EOF
        self.shut = False  # its write half is shut (its peer ended and we flushed)
        self.events = 0  # what the selector watches it for now


class Relay:
    def __init__(self, routes: list[tuple[socket.socket, str]]) -> None:
        self.sel = selectors.DefaultSelector()
        self.pairs = 0
        for listener, path in routes:
            self.sel.register(listener, selectors.EVENT_READ, path)

    def run(self) -> None:
        while True:
            for key, mask in self.sel.select():
                if isinstance(key.data, str):
                    self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
                elif key.data.sock.fileno() >= 0:  # not closed earlier in this round
                    self._serve(key.data, mask)

    def _accept(self, listener: socket.socket, path: str) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        if self.pairs >= MAX_PAIRS:
            client.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            upstream.close()
            client.close()
            return
        a, b = _Side(client), _Side(upstream)
        a.peer, b.peer = b, a
        self.pairs += 1
        for side in (a, b):
            side.sock.setblocking(False)
            self._watch(side)

    def _serve(self, side: _Side, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and side.out:
                del side.out[:side.sock.send(side.out)]
            if mask & selectors.EVENT_READ:
                data = side.sock.recv(CHUNK)
                if data:
                    side.peer.out += data
                else:
                    side.reading = False
        except BlockingIOError:
            pass
        except OSError:
            self._close(side)
            return
        for s in (side, side.peer):
            if not s.reading and not s.peer.out and not s.peer.shut:
                try:
                    s.peer.sock.shutdown(socket.SHUT_WR)  # pass the EOF on
                except OSError:
                    pass
                s.peer.shut = True
        if side.shut and side.peer.shut:
            self._close(side)
            return
        self._watch(side)
        self._watch(side.peer)

    def _watch(self, side: _Side) -> None:
        """Read while it has not ended and its peer's buffer has room; write while bytes
        wait for it."""
        events = 0
        if side.reading and len(side.peer.out) < CHUNK:
            events |= selectors.EVENT_READ
        if side.out:
            events |= selectors.EVENT_WRITE
        if events == side.events:
            return
        if not side.events:
            self.sel.register(side.sock, events, side)
        elif not events:
            self.sel.unregister(side.sock)
        else:
            self.sel.modify(side.sock, events, side)
        side.events = events

    def _close(self, side: _Side) -> None:
        for s in (side, side.peer):
            if s.events:
                self.sel.unregister(s.sock)
                s.events = 0
            s.sock.close()
        self.pairs -= 1


def serve(routes: list[tuple[socket.socket, str]]) -> None:
    """The relay's process body: never returns (dies with its parent, the agent)."""
    try:
        Relay(routes).run()
    except OSError as exc:
        if exc.errno != errno.EINTR:
            os.write(2, f"agentos bridge: {exc}\n".encode())
    os._exit(0)
