"""HTTP requests into ordinary syscalls: the front end's thread hands each one to the loop.

The loop thread is the only one that touches kernel state, so a request crosses with
`Calls.post` and enters `Kernel.execute`, the same path a ROUTER message takes after decoding:
the same access check (`Guard`), scheduler, audit and accounting. Nothing crosses as bytes:
the argument struct the front end built (and validated, `msgspec.convert`) goes to `execute`
as it is, with the capability `authenticate` verified, and the outcome comes back as the
`Reply`/`Chunk`/`Error` struct holding the result object. Each HTTP call gets a route of its
own (a `LocalRoute`, `\\0http` + 8 bytes, which no ZeroMQ peer can hold: libzmq's own routing
ids are 5 bytes and peers may not choose ids that start with a zero byte), and the loop
delivers that route's outcome to a sink instead of the ROUTER, after the batch commits, like
any reply.
A route is a connection: a client that goes away fails its parked call (`ECANCELED`), which
cancels the generation, just as when an agent dies.

The HTTP caller's principal is `http:<name>`, the `http:` audience of its token: over HTTP the
bearer token is the only credential, so only tokens minted for the HTTP door (an `http:`
audience, `agentos token http NAME`) are accepted there, and tokens bound to an agent or a local
user cannot be replayed over HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.access.rules import Capability
from kernel.call import Call, Caller, LocalRoute
from kernel.doors import Door
from sdk import abi
from sdk.tokens import TokenError

if TYPE_CHECKING:
    from kernel.core import Kernel

HTTP_AUDIENCE = "http:"
_ACCEPTED = object()  # the call passed its checks and is parked (a generation in flight)


@dataclass(frozen=True)
class Key:
    """An authenticated HTTP caller: the principal its token stands for, the token, and the
    capability it verified to."""

    principal: str
    token: str
    capability: Capability
    agent_id: int | None = None  # set at an agent's own door (agentdoor.py)


class Refused(Exception):
    """A request the front end answers with this HTTP status and message."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


@dataclass(eq=False)
class Exchange:
    """One syscall made over HTTP: its route and the frames the loop delivers for it."""

    route: bytes
    aloop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    finished: bool = False

    def put(self, item: Any) -> None:
        """From the loop thread: hand a frame (or a marker) to the HTTP thread."""
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the HTTP loop has closed (shutdown); nobody is waiting any more

    async def next(self) -> Any:
        """The next delivery: `_ACCEPTED`, a `Chunk`, a final `Reply`/`Error`, or a `Refused`."""
        item = await self.queue.get()
        if isinstance(item, abi.Reply | abi.Error | Refused):
            self.finished = True
        return item


class Bridge:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self._routes = itertools.count(1)  # used on the HTTP thread only
        # The loop thread's: where each route's outcomes go (`HttpServer.deliver`), as the
        # `Reply`, `Chunk` or `Error` struct holding the result object, not msgpack.
        self.sinks: dict[bytes, Callable[[Any], None]] = {}

    # --- the HTTP thread's side --------------------------------------------------------------

    def open(self, key: Key, name: str, args: abi.Args | None,
             timeout_ms: int | None = None) -> Exchange:
        """Start syscall `name` for `key` (from `authenticate`); read the outcome from the
        exchange."""
        ex = Exchange(LocalRoute(b"\0http" + next(self._routes).to_bytes(8, "big")),
                      asyncio.get_running_loop())
        given = args if args is not None else abi.NoArgs()
        self.k.calls.post(lambda: self._start(ex, key, name, given, timeout_ms))
        return ex

    async def call(self, key: Key, name: str, args: abi.Args | None,
                   result_type: Any = Any, timeout_ms: int | None = None,
                   gone: Awaitable[Any] | None = None) -> Any:
        """One syscall to its end: the decoded result, or `Refused`/`Failed` raised. If `gone`
        (the client's disconnect) completes first, the call is cancelled."""
        ex = self.open(key, name, args, timeout_ms)
        watcher = asyncio.ensure_future(gone) if gone is not None else None
        if watcher is not None:
            watcher.add_done_callback(lambda _: self.close(ex))
        try:
            while True:
                item = await ex.next()
                if item is _ACCEPTED or isinstance(item, abi.Chunk):
                    continue
                return final(item, result_type)
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close(ex)

    async def events(self, ex: Exchange, chunk_type: Any,
                     result_type: Any) -> AsyncIterator[Any]:
        """A streamed syscall's chunks (decoded), then its final result; raises as `call`."""
        while True:
            item = await ex.next()
            if item is _ACCEPTED:
                continue
            if isinstance(item, abi.Chunk):
                yield _typed(item.data, chunk_type)
                continue
            yield final(item, result_type)
            return

    async def accepted(self, ex: Exchange) -> Any:
        """Wait until the call is parked (None) or has already ended (its final item)."""
        item = await ex.next()
        return None if item is _ACCEPTED else item

    def close(self, ex: Exchange) -> None:
        """The HTTP side is done with `ex`: forget its route, cancelling the call if it still
        runs (the client went away)."""
        self.k.calls.post(lambda: self._close(ex.route))

    def authenticate(self, token: str | None) -> Key:
        """The caller that `token` stands for, or `Refused(401)`. Every request passes here
        before its body is read (app.Authenticated), and its syscalls then go out as this key.

        This runs on the HTTP thread: checking a token is a function of the token and the
        kernel's key alone (`TokenAuthority.verify`, whose cache two threads may share), so a
        flood of forged keys costs the loop only their denials, posted to it to be audited
        (rate-limited there, like any denial)."""
        if not token:
            raise Refused(401, "missing bearer token: send 'Authorization: Bearer <token>' "
                          "(mint one with `agentos token http NAME`)", "invalid_api_key")
        try:
            cap = self.k.access.authority.verify(token)
        except TokenError as exc:
            self._deny("http:?", f"invalid token: {exc.reason}", None)
            raise Refused(401, f"invalid token: {exc.reason}", "invalid_api_key") from None
        audiences = [a for a in cap.audiences if a.startswith(HTTP_AUDIENCE)]
        if len(audiences) != 1 or len(set(cap.audiences)) != 1:
            self._deny("http:?", "not an HTTP token", cap.token_id)
            raise Refused(401, "this token is not valid at the HTTP door (its audience is "
                          f"{', '.join(cap.audiences)}); mint an API key with "
                          "`agentos token http NAME`",
                          "invalid_api_key")
        now = time.time()
        if (cap.expires_at is not None and now >= cap.expires_at) or (
                cap.not_before is not None and now < cap.not_before):
            self._deny(audiences[0], "expired", cap.token_id)
            raise Refused(401, "token expired or not yet valid", "invalid_api_key")
        return Key(audiences[0], token, cap)

    def authenticate_agent(self, token: str | None, agent_id: int) -> Key:
        """The caller at agent `agent_id`'s own door: only a token whose one audience is that
        agent (its own, or one derived from it) is accepted there; anything else is a 401,
        audited under the agent."""
        principal = f"agent:{agent_id}"
        if not token:
            self._deny(principal, "missing key", None)
            raise Refused(401, "missing bearer token: the agent's key is in $OPENAI_API_KEY",
                          "invalid_api_key")
        try:
            cap = self.k.access.authority.verify(token)
        except TokenError as exc:
            self._deny(principal, f"invalid token: {exc.reason}", None)
            raise Refused(401, f"invalid token: {exc.reason}", "invalid_api_key") from None
        if set(cap.audiences) != {principal}:
            self._deny(principal, "another principal's token at an agent's door", cap.token_id)
            raise Refused(401, "this key is not this agent's (use $OPENAI_API_KEY)",
                          "invalid_api_key")
        now = time.time()
        if (cap.expires_at is not None and now >= cap.expires_at) or (
                cap.not_before is not None and now < cap.not_before):
            self._deny(principal, "expired", cap.token_id)
            raise Refused(401, "token expired or not yet valid", "invalid_api_key")
        return Key(principal, token, cap, agent_id)

    def _deny(self, principal: str, reason: str, token_id: str | None) -> None:
        self.k.calls.post(lambda: self.k.guard.deny(principal, "http.auth", None, reason,
                                              token_id=token_id))

    # --- the loop thread's side --------------------------------------------------------------

    def _start(self, ex: Exchange, key: Key, name: str, args: abi.Args,
               timeout_ms: int | None) -> None:
        # The key's token was verified once, at the door; the access check takes the
        # capability and checks its caveats against this call (expiry included, so one that
        # expired since is refused), its revocation and budgets.
        if key.agent_id is None:
            caller: Caller | None = Caller(key.principal, None)
        else:  # the agent's own Caller, as its SDK calls have: None once it has ended
            caller = self.k._caller(key.principal)
        if caller is None:
            ex.put(Refused(401, f"{key.principal} is not running", "invalid_api_key"))
            return
        self.sinks[ex.route] = ex.put
        self.k.calls.counts[name] += 1
        self.k.execute(Call(ex.route, 1, name, caller, timeout_ms), args, key.capability)
        if self.k.calls.find_parked(ex.route, 1) is not None:
            ex.put(_ACCEPTED)

    def _close(self, route: LocalRoute) -> None:
        call = self.k.calls.find_parked(route, 1)
        if call is None:
            self.sinks.pop(route, None)
            return

        def drop(outcome: Any) -> None:  # the cancellation's own error: nobody reads it
            self.sinks.pop(route, None)

        self.sinks[route] = drop
        self.k.calls.fail(call, abi.ErrorCode.ECANCELED, "the HTTP client went away")


class HttpDoor(Door):
    """The door (kernel/doors/__init__.py) of every HTTP front end, the `--http` listener and
    the agents' own doors alike: one bridge, so one route space. Its calls' routes are
    `LocalRoute`s, whose outcomes go to the sinks the bridge registered, as structs; it polls
    nothing of the loop's (the HTTP threads post their work to the loop)."""

    routes = LocalRoute

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def deliver(self, route: bytes, reply: Any) -> None:
        sink = self.bridge.sinks.get(route)
        if sink is not None:
            sink(reply)


class Failed(Exception):
    """A syscall that ended with an error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def final(item: Any, result_type: Any) -> Any:
    if isinstance(item, Refused):
        raise item
    if isinstance(item, abi.Error):
        raise Failed(item.code, item.message)
    return _typed(item.result, result_type)


def _typed(value: Any, kind: Any) -> Any:
    """A result object as `kind`: kernel results are of their declared types already, so this
    is a check and (at most) a copy between compatible shapes, never a serialisation."""
    if kind is Any:
        return value
    try:
        return msgspec.convert(value, kind, from_attributes=True)
    except msgspec.ValidationError as exc:
        raise abi.AbiError(f"malformed result: {exc}") from None
