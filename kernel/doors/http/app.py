"""The HTTP routes: OpenAI-compatible `/v1/*`, AIOS-compatible `/query`, Prometheus `/metrics`.

Every request authenticates with a capability token (`Authorization: Bearer <token>`, or for
AIOS's SDK, which sends no headers, the base-URL prefix `/aios/<token>`) before any route reads
its body (`Authenticated`), and does its work as syscalls through the `Bridge`, so the token's
rules decide: `llm.chat@llm/smollm2` lets a client chat with that model and no other;
`/metrics` needs `sys.stats`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kernel.doors.http import aios, aios_ops, openai
from kernel.doors.http.bridge import Bridge, Failed, Key, Refused, final
from kernel.doors.http.limits import Doorkeeper
from kernel.doors.http.metrics import render
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Kernel

log = logging.getLogger("kernel.doors.http")

# Syscall error codes as HTTP statuses.
STATUS = {abi.ErrorCode.EPERM: 403, abi.ErrorCode.ENOENT: 404, abi.ErrorCode.EINVAL: 400,
          abi.ErrorCode.EAGAIN: 503, abi.ErrorCode.EBUSY: 409, abi.ErrorCode.ENOSYS: 501,
          abi.ErrorCode.EQUOTA: 429, abi.ErrorCode.ETIMEDOUT: 504,
          abi.ErrorCode.ECANCELED: 499, abi.ErrorCode.EIO: 500}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
               501: "not_implemented_error", 503: "service_unavailable"}


def refusal(exc: Refused | Failed) -> Refused:
    if isinstance(exc, Refused):
        return exc
    code = abi.ErrorCode(exc.code) if exc.code in abi.ErrorCode._value2member_map_ else None
    status = STATUS.get(code, 500) if code is not None else 500
    name = code.name if code is not None else str(exc.code)
    message = exc.message
    missing = re.match(r"([a-z]+\.[a-z_]+): not allowed", message) if status == 403 else None
    if missing:
        message += (f"; this key lacks {missing[1]}: mint one that holds it with `agentos token "
                    f"http NAME --cap {missing[1]}`")
    return Refused(status, message, "model_not_found" if status == 404 else name)


def error_body(exc: Refused) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": exc.message,
                      "type": ERROR_TYPES.get(exc.status, "server_error"),
                      "param": exc.param, "code": exc.code}}


def openai_error(exc: Refused | Failed) -> JSONResponse:
    r = refusal(exc)
    headers = {"WWW-Authenticate": "Bearer"} if r.status == 401 else None
    return JSONResponse(error_body(r), status_code=r.status, headers=headers)


def bearer(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


class Authenticated:
    """ASGI middleware: the request's key is checked before anything reads its body, once, so
    a forged or expired key is a 401 whatever the body and a stranger learns nothing of how its
    body would have been judged. Routes find the caller in `request.state.key`."""

    def __init__(self, app: ASGIApp, bridge: Bridge) -> None:
        self.app = app
        self.bridge = bridge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        aios_path = path.startswith("/aios/")
        token = path.split("/")[2] if aios_path else bearer(Headers(scope=scope))
        agent_id = scope.get("agentos.agent")  # set only on an agent's own door (agentdoor.py)
        try:
            key = (self.bridge.authenticate(token) if agent_id is None
                   else self.bridge.authenticate_agent(token, agent_id))
        except Refused as exc:
            response: Response
            if aios_path or path == "/query":
                response = JSONResponse(aios.error_response("llm", exc.status, exc.message),
                                        status_code=exc.status)
            else:
                response = openai_error(exc)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["key"] = key
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            pass  # gone while its body was read (or closed by a limit): nobody to answer


def key_of(request: Request) -> Key:
    return request.state.key


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and bad UTF-8 alike
        raise Refused(400, f"malformed JSON body: {exc}", "invalid_json") from None


class Routes:
    def __init__(self, kernel: Kernel, keeper: Doorkeeper, bridge: Bridge) -> None:
        self.k = kernel
        self.bridge = bridge
        self.keeper = keeper

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/query", self.query, methods=["POST"]),
            Route("/aios/{token}/query", self.query, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ], middleware=[Middleware(Authenticated, bridge=self.bridge)])

    # --- OpenAI ------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        try:
            infos = await self.bridge.call(key_of(request), "llm.models", None,
                                           list[abi.ModelInfo])
        except (Refused, Failed) as exc:
            return openai_error(exc)
        return JSONResponse(openai.models(infos, self.k.started_at))

    def _served(self, exc: Refused) -> Refused:
        """An unknown model refused at the door (a name no model can have) says what is
        served, as the kernel's own refusal does."""
        if exc.code == "model_not_found" and "(served:" not in exc.message:
            exc.message += f" (served: {self.k.llm.served()})"
        return exc

    async def get_model(self, request: Request) -> Response:
        """OpenAI's `models.retrieve`: one served model or alias, else 404 naming the served."""
        name = request.path_params["model"]
        try:
            infos = await self.bridge.call(key_of(request), "llm.models", None,
                                           list[abi.ModelInfo])
        except (Refused, Failed) as exc:
            return openai_error(exc)
        for entry in openai.models(infos, self.k.started_at)["data"]:
            if entry["id"] == name:
                return JSONResponse(entry)
        return openai_error(Refused(404, f"no model {name!r} (served: "
                                         f"{self.k.llm.served()})", "model_not_found"))

    async def chat_completions(self, request: Request) -> Response:
        key = key_of(request)
        try:
            body = await json_body(request)
            args = openai.chat_args(body)
        except Refused as exc:
            return openai_error(self._served(exc))
        cid = openai.completion_id()
        if not body.get("stream"):
            try:
                result = await self.bridge.call(key, "llm.chat", args, abi.ChatResult,
                                                gone=disconnected(request))
            except (Refused, Failed) as exc:
                return openai_error(exc)
            return JSONResponse(openai.completion(cid, result))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        ex = self.bridge.open(key, "llm.chat", args)
        # Wait until the call is admitted, so a refusal is still a proper HTTP status.
        first = await self.bridge.accepted(ex)
        if first is not None:
            self.bridge.close(ex)
            try:
                result = final(first, abi.ChatResult)
            except (Refused, Failed) as exc:
                return openai_error(exc)
            return StreamingResponse(self._replay(cid, result, include_usage),
                                     media_type="text/event-stream")
        model = self.k.llm.resolve(args.model, args)
        return StreamingResponse(self._stream(ex, cid, model, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _replay(self, cid: str, result: abi.ChatResult,
                      include_usage: bool) -> AsyncIterator[bytes]:
        yield openai.chunk(cid, result.model, {"role": "assistant", "content": ""})
        for event in openai.final_chunks(cid, result, include_usage, content_sent=False):
            yield event

    async def _stream(self, ex: Any, cid: str, model: str,
                      include_usage: bool) -> AsyncIterator[bytes]:
        """Server-sent events; a client that disconnects cancels the generation (Starlette
        cancels this generator, and `finally` closes the call's route)."""
        try:
            yield openai.chunk(cid, model, {"role": "assistant", "content": ""})
            sent = False
            async for item in self.bridge.events(ex, abi.ChatDelta, abi.ChatResult):
                if isinstance(item, abi.ChatDelta):
                    if item.text:
                        sent = True
                        yield openai.chunk(cid, model, {"content": item.text})
                    continue
                for event in openai.final_chunks(cid, item, include_usage, content_sent=sent):
                    yield event
        except (Refused, Failed) as exc:
            yield b"data: " + json.dumps(error_body(refusal(exc))).encode() + b"\n\n"
        finally:
            self.bridge.close(ex)

    async def embeddings(self, request: Request) -> Response:
        try:
            args, encoding, dimensions = openai.embedding_args(await json_body(request))
            result = await self.bridge.call(key_of(request), "memory.embed", args,
                                            abi.EmbedResult,
                                            gone=disconnected(request))
            return JSONResponse(openai.embeddings(result, encoding, dimensions))
        except (Refused, Failed) as exc:
            return openai_error(exc)

    # --- AIOS --------------------------------------------------------------------------------

    async def query(self, request: Request) -> Response:
        key = key_of(request)
        query_type = "llm"
        try:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise Refused(400, "the request body must be a JSON object")
            query_type = body.get("query_type")
            if query_type not in aios.QUERY_TYPES:
                raise Refused(400, f"query_type must be one of {', '.join(aios.QUERY_TYPES)}")
            if query_type != "llm":
                return await self._query_op(request, key, query_type, body.get("query_data"))
            args = aios.llm_args(body.get("query_data"),
                                 [*self.k.llm.workers, *self.k.llm.aliases, *self.k.llm.routes])
            started = time.time()
            result = await self.bridge.call(key, "llm.chat", args, abi.ChatResult,
                                            gone=disconnected(request))
        except (Refused, Failed) as exc:
            r = self._served(refusal(exc))
            return JSONResponse(aios.error_response(str(query_type), r.status, r.message),
                                status_code=r.status)
        return JSONResponse(aios.llm_response(result, started))

    async def _query_op(self, request: Request, key: Key, query_type: str,
                        data: Any) -> Response:
        """A memory, storage or tool query: its syscalls, one after another, as the token's
        principal. Refusals raise to `query`, which shapes them."""

        async def call(name: str, args: abi.Args | None, result_type: Any) -> Any:
            return await self.bridge.call(key, name, args, result_type,
                                          gone=disconnected(request))

        started = time.time()
        fields = await aios_ops.OPERATIONS[query_type](data, call)
        return JSONResponse(aios_ops.response(query_type, fields, started))

    # --- metrics -----------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        try:
            stats = await self.bridge.call(key_of(request), "sys.stats", None, abi.Stats)
        except (Refused, Failed) as exc:
            return openai_error(exc)
        return Response(render(stats, self.keeper.figures()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")
