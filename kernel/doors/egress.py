"""The egress proxy: an agent's only way to the network, one `net.connect@HOST:PORT` at a time.

Each strict or standard agent gets a proxy on 127.0.0.1:3128 of its own network namespace,
with HTTPS_PROXY, HTTP_PROXY and ALL_PROXY (and lowercase) pointing there: its launcher binds
the listener in the namespace and hands it to the kernel, which serves it here (a socket stays
in the namespace it was made in; only the agent's processes are in it). Whoever connects is
that agent: nothing the agent says names it. It speaks HTTP CONNECT (a TCP tunnel, for https)
and plain HTTP forwarding (`GET http://host/path`, sent on as `Connection: close`); for each
connection

1. the target is parsed into its canonical endpoint (sdk/endpoints.py; IP literals in
   disguise, `0x7f.1`, are refused), and a plain-HTTP request to a CONNECT-only port
   (`egress_connect_only`, 443) is refused;
2. on the kernel's loop, the agent's capability (its own token, or a token of its own audience
   in `Proxy-Authorization`) is checked for `net.connect@net/HOST:PORT` by the guard, like any
   syscall: caveats, revocation, `calls` budget, a denial audited;
3. a name is resolved here, once (after the check, so an ungranted name is never looked up);
   addresses that are not global (loopback, private, link-local, ...) are dropped unless a rule
   names them by IP (`Capability.names_ip`), and the proxy connects to the address it checked,
   so a second, rebinding answer has nothing to change;
4. bytes are relayed and counted against the token's `bytes` budgets, reserved a step ahead
   (`BYTES_STEP`): the tunnel ends when the budget does. Open and end are audited (`egress`,
   `egress-end` with the bytes each way).

A refusal is an HTTP answer the agent's client shows (403 naming the capability it lacks, 407,
429, 400, 502) before the connection closes. Connections are bounded per agent
(`egress_connections`; beyond, 429: a flood from one agent leaves its neighbours' alone) and in
total. A tunnel ends when any token it stands on is revoked (`AccessManager.watchers`) or
expires, and when its agent ends. The proxy runs one asyncio loop on a thread of its own,
started with the first agent; it touches kernel state only through `Calls.post`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from kernel.access.rules import Capability
from kernel.call import Fault
from kernel.doors.served import Served
from sdk import abi, endpoints
from sdk.tokens import TokenError

if TYPE_CHECKING:
    from kernel.core import Kernel

log = logging.getLogger("kernel.doors.egress")

OP = "net.connect"
HEAD_BYTES = 16 * 1024  # a request line and headers longer than this: 431
CHUNK = 64 * 1024
BYTES_STEP = 256 * 1024  # taken from a `bytes` budget at a time
_HOP_HEADERS = {"proxy-authorization", "proxy-connection", "connection", "keep-alive", "te",
                "upgrade"}
_REASONS = {400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required",
            429: "Too Many Requests", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 504: "Gateway Timeout"}
T = TypeVar("T")


class Refused(Exception):
    """A connection answered with this HTTP status and message, then closed. `short` joins
    the status line's reason: a client that fails a CONNECT shows that line, not the body."""

    def __init__(self, status: int, message: str, short: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.short = short


@dataclass(eq=False)
class Tunnel:
    """One agent connection through the proxy, from its request to its close."""

    agent_id: int
    writers: list[asyncio.StreamWriter]
    target: str = ""
    cap: Capability | None = None
    chain: frozenset[str] = frozenset()  # token ids whose revocation ends it
    allowance: int | None = None  # bytes reserved and not yet relayed (None: no budget)
    up: int = 0
    down: int = 0
    task: asyncio.Task[Any] | None = None
    ended: str | None = None  # why the kernel ended it (revoked, expired, agent ended)
    address: str = ""  # the address it connected to
    relaying: bool = False  # the answer has begun: no refusal can be sent any more
    timer: asyncio.TimerHandle | None = None  # its token's expiry
    reserving: asyncio.Lock = field(default_factory=asyncio.Lock)

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
        if self.task is not None:
            self.task.cancel()
        for w in self.writers:
            w.close()


def parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    """(method, target, headers) of a request head, or Refused(400)."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = []
        for line in lines[1:]:
            if not line:
                break
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError(line)
            headers.append((name, value.strip()))
    except ValueError:
        raise Refused(400, "malformed request: this is an HTTP proxy (CONNECT host:port, or "
                      "METHOD http://host/path)") from None
    if not version.startswith("HTTP/1.") or not method.isalpha():
        raise Refused(400, f"unsupported request line {lines[0][:80]!r}")
    return method.upper(), target, headers


def parse_target(method: str, target: str) -> tuple[str, int, str]:
    """(canonical host, port, origin-form path) of the request's target, or Refused(400)."""
    try:
        if method == "CONNECT":
            host, port = endpoints.split(target)
            path = ""
        else:
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname or "@" in url.netloc:
                hint = " (https goes through CONNECT: set HTTPS_PROXY)" \
                    if url.scheme == "https" else ""
                raise Refused(400, f"{method} needs an absolute http:// URL{hint}")
            host, port = url.hostname, str(url.port or 80)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"port {port!r} is not 1..65535")
        return endpoints.canonical_host(host), int(port), path
    except ValueError as exc:
        raise Refused(400, f"bad target {target[:200]!r}: {exc}") from None


def proxy_token(headers: list[tuple[str, str]]) -> str | None:
    """The token a client sent in `Proxy-Authorization` (Basic, as password or user, or
    Bearer), or None."""
    for name, value in headers:
        if name.lower() != "proxy-authorization":
            continue
        scheme, _, cred = value.partition(" ")
        if scheme.lower() == "bearer":
            return cred.strip()
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise Refused(407, "malformed Proxy-Authorization") from None
            return password or user
        raise Refused(407, f"unsupported Proxy-Authorization scheme {scheme[:20]!r}")
    return None


class Egress:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # The proxy thread's, after setup: servers, each agent's own capability, open tunnels.
        self._served = Served("egress proxy")
        self._caps: dict[int, Capability | str] = {}  # a str: its key, verified at first use
        self._open: dict[int, set[Tunnel]] = {}
        # Tokens revoked lately, oldest first (id -> when): a tunnel whose check passed just
        # before its token was revoked, still resolving or dialling, must not start relaying.
        # Kept only as long as a setup can take, so it stays bounded however many are revoked.
        self._revoked_ids: dict[str, float] = {}
        self.total = 0
        self.counts: Counter[str] = Counter()
        kernel.access.watchers.append(self._revoked)

    # --- the kernel loop's side --------------------------------------------------------------

    def _start(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, name="egress",
                                            daemon=True)
            self._thread.start()
        return self.loop

    def open(self, agent_id: int, sock: socket.socket, key: str) -> None:
        """Serve the agent's proxy on `sock`, the listener its launcher bound on 127.0.0.1:3128
        in the agent's own namespace (only the agent's processes reach it); `key` is the
        agent's own token, which connections without `Proxy-Authorization` stand on."""
        sock.setblocking(False)
        loop = self._start()

        async def start() -> asyncio.base_events.Server:
            # Verified at its first connection, here, off the kernel's loop: most agents
            # never make one, and a spawn need not wait for it.
            self._caps[agent_id] = key

            async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await self._connection(agent_id, r, w)

            try:
                return await asyncio.start_server(on_connect, sock=sock, limit=HEAD_BYTES)
            except BaseException:
                sock.close()
                raise

        self._served.open(loop, agent_id, start)

    def close(self, agent_id: int) -> None:
        """The agent is over: stop serving its socket and end its tunnels."""
        if self.loop is None:
            return

        def end() -> None:
            self._caps.pop(agent_id, None)
            for tunnel in list(self._open.get(agent_id, ())):
                tunnel.end("the agent ended")

        self._served.close(self.loop, agent_id, end)

    def _revoked(self, ids: frozenset[str]) -> None:
        """On the kernel loop (`AccessManager.watchers`): end the tunnels standing on them."""
        if self.loop is None:
            return

        def end() -> None:
            now = time.monotonic()
            keep = now - 4 * self.k.config.egress_timeout - 60  # head, resolve, dial, margin
            for token_id in ids:
                self._revoked_ids.pop(token_id, None)
                self._revoked_ids[token_id] = now
            while self._revoked_ids:
                oldest = next(iter(self._revoked_ids))
                if self._revoked_ids[oldest] >= keep:
                    break
                del self._revoked_ids[oldest]
            for tunnels in self._open.values():
                for tunnel in list(tunnels):
                    if tunnel.chain & ids:
                        tunnel.end("token revoked")

        self.loop.call_soon_threadsafe(end)

    def figures(self) -> dict[str, Any]:
        return {"agents": len(self._served), "open": self.total, **self.counts}

    def stop(self) -> None:
        if self.loop is None:
            return
        for agent_id in self._served.opened():
            self.close(agent_id)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the proxy thread's side -------------------------------------------------------------

    async def _on_kernel(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the kernel's loop (the only thread that touches kernel state) and wait
        for its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                (future.set_result if ok else future.set_exception)(value)

        def run() -> None:
            try:
                result: Any = fn()
                ok = True
            except Exception as exc:
                result, ok = exc, False
            loop.call_soon_threadsafe(settle, ok, result)

        self.k.calls.post(run)
        return await future

    def _deny(self, agent_id: int, target: str | None, reason: str,
              token_id: str | None = None) -> None:
        self.counts["refused"] += 1
        self.k.calls.post(lambda: self.k.guard.deny(f"agent:{agent_id}", OP, target, reason,
                                              token_id=token_id))

    async def _connection(self, agent_id: int, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        tunnels = self._open.setdefault(agent_id, set())
        limit = self.k.config.egress_connections
        if len(tunnels) >= limit or self.total >= self.k.config.egress_total:
            self.counts["busy"] += 1
            if len(tunnels) >= limit:
                self._deny(agent_id, None, f"over {limit} open connections")
            await self._answer(writer, 429, f"this agent has {len(tunnels)} connections open "
                               "through the proxy, its most (kernel config "
                               "egress_connections): close some")
            return
        tunnel = Tunnel(agent_id, [writer], task=asyncio.current_task())
        tunnels.add(tunnel)
        self.total += 1
        try:
            await self._serve(tunnel, reader, writer)
        except Refused as exc:
            tunnel.ended = tunnel.ended or f"{exc.status}: {exc.message}"
            if not tunnel.relaying:
                await self._answer(writer, exc.status, exc.message, exc.short)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            tunnels.discard(tunnel)
            self.total -= 1
            for w in tunnel.writers:
                w.close()
            self._settle(tunnel)

    async def _answer(self, writer: asyncio.StreamWriter, status: int, message: str,
                      short: str = "") -> None:
        body = f"agentos egress: {message}\n".encode()
        reason = _REASONS.get(status, "Error") + (f" ({short})" if short else "")
        head = (f"HTTP/1.1 {status} {reason}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n")
        if status == 407:
            head += 'Proxy-Authenticate: Basic realm="agentos"\r\n'
        try:
            writer.write(head.encode() + b"\r\n" + body)
            await asyncio.wait_for(writer.drain(), 5)
        except (OSError, TimeoutError):
            pass
        writer.close()

    async def _serve(self, tunnel: Tunnel, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        timeout = self.k.config.egress_timeout
        agent_id = tunnel.agent_id
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.LimitOverrunError:
            raise Refused(431, f"request head longer than {HEAD_BYTES} bytes") from None
        except TimeoutError:
            raise Refused(400, f"no request head within {timeout:g} s") from None
        except asyncio.IncompleteReadError:
            return
        method, target, headers = parse_head(head)
        host, port, path = parse_target(method, target)
        tunnel.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        resource = endpoints.resource(host, port)
        if method != "CONNECT" and port in self.k.config.egress_connect_only:
            self._deny(agent_id, resource, f"{method} to a CONNECT-only port")
            raise Refused(403, f"{tunnel.target} takes CONNECT only (an https:// URL through "
                          f"HTTPS_PROXY), not plain-HTTP {method}", "CONNECT only")
        cap = await self._capability(agent_id, headers)
        tunnel.cap = cap
        try:
            tunnel.chain = frozenset(await self._on_kernel(
                lambda: self._admit(agent_id, cap, resource, method)))
        except Fault as exc:
            raise Refused(403, f"{tunnel.target} refused: {exc.message}. This agent needs "
                          f"the capability {OP}@{tunnel.target}",
                          f"needs {OP}@{tunnel.target}") from None
        addresses = await self._resolve(host, port, timeout)
        allowed = [a for a in addresses if endpoints.public(a) or cap.names_ip(OP, a, port)]
        if not allowed:
            shown = ", ".join(map(str, addresses[:4]))
            self._deny(agent_id, resource, f"resolves to a non-global address ({shown})",
                       cap.token_id)
            raise Refused(403, f"{tunnel.target} resolves to {shown}: a loopback, private or "
                          "link-local address is reached only when granted by IP "
                          f"({OP}@{addresses[0]}:{port})",
                          f"{tunnel.target} is local; needs {OP}@{addresses[0]}:{port}")
        if cap.expires_at is not None:
            left = cap.expires_at - time.time()
            tunnel.timer = asyncio.get_running_loop().call_later(
                max(0.0, left), tunnel.end, "token expired")
        up_reader, up_writer, address = await self._dial(allowed, port, timeout, tunnel.target)
        tunnel.writers.append(up_writer)
        self.counts["tunnels"] += 1
        tunnel.address = str(address)
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            forwarded = [f"{method} {path} HTTP/1.1"]
            forwarded += [f"{n}: {v}" for n, v in headers if n.lower() not in _HOP_HEADERS]
            forwarded.append("Connection: close")
            first = ("\r\n".join(forwarded) + "\r\n\r\n").encode("latin-1")
            if await self._take(tunnel, len(first)) < len(first):
                raise Refused(403, f"{tunnel.ended}", "bytes budget exhausted")
            tunnel.up += len(first)
            up_writer.write(first)
        if tunnel.chain & self._revoked_ids.keys():  # revoked while it was being checked or dialled
            tunnel.end("token revoked")
            return
        tunnel.relaying = True
        up = asyncio.ensure_future(self._pump(tunnel, reader, up_writer, "up"))
        down = asyncio.ensure_future(self._pump(tunnel, up_reader, writer, "down"))
        try:
            if method == "CONNECT":  # a TCP tunnel: each side may half-close on its own
                await asyncio.wait((up, down), return_when=asyncio.FIRST_EXCEPTION)
            else:  # one request (sent on with `Connection: close`), one response
                await down
        finally:
            up.cancel()
            down.cancel()

    async def _capability(self, agent_id: int, headers: list[tuple[str, str]]) -> Capability:
        token = proxy_token(headers)
        cap = self._caps.get(agent_id)
        if token is None:
            if cap is None:
                raise Refused(403, "this agent has ended")
            if isinstance(cap, str):  # its own key, not verified yet
                try:
                    cap = self.k.access.authority.verify(cap)
                except TokenError as exc:
                    self._deny(agent_id, None, f"invalid token: {exc.reason}")
                    raise Refused(407, f"invalid token: {exc.reason}") from None
                if agent_id in self._caps:
                    self._caps[agent_id] = cap
            return cap
        principal = f"agent:{agent_id}"
        try:
            given = self.k.access.authority.verify(token)  # the token and the key alone
        except TokenError as exc:
            self._deny(agent_id, None, f"invalid token: {exc.reason}")
            raise Refused(407, f"invalid token: {exc.reason}") from None
        if set(given.audiences) != {principal}:
            self._deny(agent_id, None, "another principal's token at an agent's proxy",
                       given.token_id)
            raise Refused(407, "this token is not this agent's (its audience must be "
                          f"{principal})")
        return given

    def _admit(self, agent_id: int, cap: Capability, resource: str,
               method: str) -> tuple[str, ...]:
        """On the kernel loop: the guard's check, as for a syscall, audited either way in the
        same commit as its budget; the token's chain."""
        principal = f"agent:{agent_id}"
        caller = self.k._caller(principal)
        if caller is None:
            raise Fault(abi.ErrorCode.EPERM, "the agent is not running")
        self.k.guard.check(cap, OP, resource, caller)
        self.k.audit.append(principal, "egress", resource=resource, method=method,
                            token=cap.token_id)
        return self.k.access.chain(cap.token_id)

    async def _resolve(self, host: str, port: int, timeout: float) -> list[Any]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError) as exc:
            raise Refused(502, f"cannot resolve {host}: {exc}") from None
        seen: list[Any] = []
        for *_, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0].partition("%")[0])
            if address not in seen:
                seen.append(address)
        if not seen:
            raise Refused(502, f"{host} has no address")
        return seen

    async def _dial(self, addresses: list[Any], port: int, timeout: float,
                    target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
        error: Exception | None = None
        for address in addresses:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=CHUNK), timeout)
                return r, w, address
            except (OSError, TimeoutError) as exc:
                error = exc
        raise Refused(502, f"cannot connect to {target}: {error or 'no address'}")

    async def _take(self, tunnel: Tunnel, n: int) -> int:
        """How many of the next `n` bytes may pass (all of them without a `bytes` budget),
        counted: the allowance reserved from the budget, topped up a step at a time."""
        cap = tunnel.cap
        assert cap is not None
        if not any(b[0] == "bytes" for b in cap.budgets):
            return n
        async with tunnel.reserving:
            while (tunnel.allowance or 0) < n and tunnel.ended is None:
                try:
                    got = await self._on_kernel(
                        lambda: self.k.access.reserve(cap, "bytes", max(n, BYTES_STEP)))
                except Fault as exc:
                    tunnel.ended = f"{exc.message} (the token's bytes budget)"
                    break
                tunnel.allowance = (tunnel.allowance or 0) + (got or 0)
            passed = min(n, tunnel.allowance or 0)
            tunnel.allowance = (tunnel.allowance or 0) - passed
            return passed

    async def _pump(self, tunnel: Tunnel, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter, direction: str) -> None:
        while True:
            data = await src.read(CHUNK)
            if not data:
                break
            passed = await self._take(tunnel, len(data))
            if direction == "up":
                tunnel.up += passed
            else:
                tunnel.down += passed
            dst.write(data[:passed])
            await dst.drain()
            if passed < len(data):
                tunnel.end(tunnel.ended or "bytes budget exhausted")
                return
        if dst.can_write_eof():
            try:
                dst.write_eof()
            except OSError:
                pass

    def _settle(self, tunnel: Tunnel) -> None:
        """Give back the unused reservation and audit the end of a tunnel that opened."""
        cap, left = tunnel.cap, tunnel.allowance
        if tunnel.timer is not None:
            tunnel.timer.cancel()
        if cap is not None and left:
            self.k.calls.post(lambda: self.k.access.refund(cap, "bytes", left))
        if tunnel.chain:  # admitted (and audited `egress`): its end is audited too
            detail = {"target": tunnel.target, "address": tunnel.address, "up": tunnel.up,
                      "down": tunnel.down, "reason": tunnel.ended or "closed"}
            self.k.calls.post(lambda: self.k.audit.append(f"agent:{tunnel.agent_id}", "egress-end",
                                                    **detail))
