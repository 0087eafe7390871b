"""What one HTTP peer may hold of the kernel: connections, time to send a request, bytes.

The front end runs inside the kernel, whose file descriptors it shares with agents, rings and
SQLite. Uvicorn alone holds a connection that has sent half a request for as long as the peer
keeps it open (3,000 of them were all still held after 70 s), and has no cap per peer. So every
connection passes `Doorkeeper` before uvicorn sees it, and `GuardedHttp` (uvicorn's httptools
protocol) bounds the request it carries:

- at most `http_max_connections` open, and `http_max_per_peer` from one peer (an IPv4 address,
  an IPv6 /64): beyond either, the connection gets a 503 and is closed at once;
- a request's headers must be complete `http_header_timeout` seconds after its first byte (or
  after the connection opened), and its body `http_body_timeout` seconds after the headers:
  else 408 (if no response has started) and the connection is closed. Between requests,
  uvicorn's keep-alive timeout closes an idle connection;
- headers (request line included) of at most `http_header_bytes` (431), a body of at most
  `http_body_bytes`, by its Content-Length or as it arrives (413).

Each refusal is counted by limit for `/metrics`. Everything here runs on the HTTP thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

LIMITS = ("connections", "peer_connections", "header_timeout", "body_timeout", "header_bytes",
          "body_bytes")


def peer_of(peername: Any) -> str:
    """The key a peer is counted under: its IPv4 address, or its IPv6 /64 (one host usually
    has a whole /64 to pick addresses from)."""
    host = peername[0] if isinstance(peername, tuple) and peername else str(peername)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class Doorkeeper:
    """The front end's connection counts and limits, and what it refused."""

    max_connections: int
    max_per_peer: int
    header_timeout: float
    body_timeout: float
    header_bytes: int
    body_bytes: int
    open: int = 0
    accepted: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)  # by limit (LIMITS)

    def admit(self, peer: str) -> str | None:
        """Count a new connection from `peer`, or say which limit refuses it."""
        if self.open >= self.max_connections:
            return "connections"
        if self.by_peer.get(peer, 0) >= self.max_per_peer:
            return "peer_connections"
        self.open += 1
        self.accepted += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        return None

    def release(self, peer: str) -> None:
        self.open -= 1
        self.by_peer[peer] -= 1
        if not self.by_peer[peer]:
            del self.by_peer[peer]

    def figures(self) -> dict[str, Any]:
        return {"open": self.open, "peers": len(self.by_peer), "accepted": self.accepted,
                "refused": {limit: self.refused[limit] for limit in LIMITS}}


def _response(status: int, message: str) -> bytes:
    body = message.encode()
    return (STATUS_LINE[status] + b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
            + body)


class GuardedHttp(HttpToolsProtocol):
    """Uvicorn's httptools protocol under a `Doorkeeper` (`guarded(keeper)` binds one)."""

    keeper: ClassVar[Doorkeeper]
    _peer: str | None = None  # set once admitted; None: refused, uvicorn never saw it
    _deadline: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _body_bytes = 0
    _refused = False  # a limit closed the connection: the parser's remaining callbacks are moot

    # --- the connection ----------------------------------------------------------------------

    def peer_key(self, transport: asyncio.BaseTransport) -> str | None:
        """The key this connection is counted under; None refuses it outright."""
        return peer_of(transport.get_extra_info("peername"))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = self.peer_key(transport)
        if peer is None:
            transport.close()
            return
        refused = self.keeper.admit(peer)
        if refused is not None:
            # Best effort: a request that already arrived unread turns the close into a reset.
            self.keeper.refused[refused] += 1
            transport.write(_response(503, "too many connections; retry later"))
            transport.close()
            return
        self._peer = peer
        super().connection_made(transport)
        self._arm("header_timeout", self.keeper.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer is None:
            return
        self._disarm()
        self.keeper.release(self._peer)
        self._peer = None
        super().connection_lost(exc)

    def _arm(self, limit: str, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._refuse, limit, 408,
                                              "request not sent in time")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, limit: str, status: int, message: str) -> None:
        """Answer `status` (unless a response is under way) and close the connection."""
        self._disarm()  # (a deadline that is calling this has fired: cancelling it is harmless)
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self.keeper.refused[limit] += 1
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_response(status, message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # nothing after a refusal: it has answered already
            super().send_400_response(msg)

    # --- the parser's callbacks (each moot once refused) --------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._header_bytes = self._body_bytes = 0
        if self._deadline is None:  # the first request's runs from the connection's start
            self._arm("header_timeout", self.keeper.header_timeout)
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._count_header(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count_header(len(name) + len(value) + 4):  # ": " and CRLF
            super().on_header(name, value)

    def _count_header(self, n: int) -> bool:
        self._header_bytes += n
        if self._header_bytes > self.keeper.header_bytes:
            self._refuse("header_bytes", 431, f"request headers over {self.keeper.header_bytes} "
                         "bytes")
        return not self._refused

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        length = next((v for k, v in self.headers if k == b"content-length"), b"0")
        if length.isdigit() and int(length) > self.keeper.body_bytes:
            self._refuse("body_bytes", 413, f"request body over {self.keeper.body_bytes} bytes")
            return
        self._arm("body_timeout", self.keeper.body_timeout)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.keeper.body_bytes:
            self._refuse("body_bytes", 413, f"request body over {self.keeper.body_bytes} bytes")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()


def guarded(keeper: Doorkeeper) -> type[GuardedHttp]:
    """A protocol class for uvicorn's `http=` under `keeper`."""
    return type("GuardedHttp", (GuardedHttp,), {"keeper": keeper})
