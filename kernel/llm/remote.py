"""A model behind any OpenAI-compatible server (vLLM, Ollama, llama.cpp, another agentos).

One streamed `POST {base}/chat/completions` per request, read as server-sent events, so tokens
reach the agent as the server produces them and a cancelled request closes its connection (the
server sees the client go and frees the request's slot). Each server has one pooled httpx client
(kept-alive connections reused across requests); its timeout is an idle limit, applied to the
connect and to every read of the stream. A
stream that breaks (reset, garbage, silence past the idle limit, an end before `[DONE]`) raises
RemoteError: a reply cut short is never passed off as a finished one.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from sdk import abi


def _calls(calls: list[abi.ToolCall] | None) -> list[dict[str, Any]] | None:
    """An assistant turn's tool calls as OpenAI sends them (dropping them loses the turn)."""
    if not calls:
        return None
    return [{"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                    "arguments": c.function.arguments}}
            for c in calls]


# The longest server-sent event line read from a server: a broken or hostile one could send a
# line without end, and the whole line is held before it is parsed.
MAX_EVENT_BYTES = 1 << 20
REST_BYTES = 1 << 16  # the most read after `[DONE]` to keep a connection for reuse


class RemoteError(Exception):
    """The server refused or broke the request; the message says how. `refused`: it answered
    4xx, i.e. judged the request itself invalid (e.g. a schema it cannot enforce); `timed_out`:
    it stayed silent past the idle limit."""

    def __init__(self, message: str, refused: bool = False, timed_out: bool = False,
                 reported: bool = False, unreached: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.timed_out = timed_out
        self.reported = reported  # the server sent an error event: it is up, the request failed
        self.unreached = unreached  # no connection: the server never saw the request

    @property
    def code(self) -> abi.ErrorCode:
        if self.refused:
            return abi.ErrorCode.EINVAL
        return abi.ErrorCode.ETIMEDOUT if self.timed_out else abi.ErrorCode.EIO


class _Unfinished(RemoteError):
    """The connection ended before `[DONE]`."""


class Hangup(threading.Event):
    """A request's cancellation: setting it also shuts its socket, so a stream blocked on a
    silent server ends now rather than at the idle limit."""

    def __init__(self) -> None:
        super().__init__()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
        if self.is_set():
            self._shut()

    def set(self) -> None:
        super().set()
        self._shut()

    def _shut(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


class RemoteModel:
    """One OpenAI-compatible server, with its own pooled httpx client: keep-alive connections
    are reused across requests, up to `max_connections` open at once."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 600.0, max_connections: int = 16) -> None:
        self.base_url = base_url.rstrip("/")  # e.g. http://127.0.0.1:8000/v1
        self.model = model  # the server's name for it
        self.api_key = api_key
        self.timeout = timeout  # seconds of silence (connecting or mid-stream): ETIMEDOUT
        if not self.base_url.startswith(("http://", "https://")):
            raise RemoteError(f"unsupported URL scheme in {base_url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The probe takes a connection of its own: one over the requests' limit.
        self.client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections + 1,
                                max_keepalive_connections=max_connections + 1),
            trust_env=False)

    def close(self) -> None:
        self.client.close()

    def body(self, args: abi.ChatArgs) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{k: v for k, v in (("role", m.role), ("content", m.content),
                                              ("tool_call_id", m.tool_call_id), ("name", m.name),
                                              ("tool_calls", _calls(m.tool_calls)))
                          if v is not None} for m in args.messages],
            "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if args.stop:
            body["stop"] = args.stop
        if args.continue_final:  # vLLM's spelling: go on with the last (assistant) message
            body["continue_final_message"], body["add_generation_prompt"] = True, False
        if args.seed is not None:
            body["seed"] = args.seed
        # The structure asked for, as OpenAI and vLLM spell it: the server enforces it.
        if args.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "response", "schema": args.json_schema, "strict": True}}
        elif args.response_format == "json":
            body["response_format"] = {"type": "json_object"}
        if args.regex is not None:
            body["guided_regex"] = args.regex
        if args.choice is not None:
            body["guided_choice"] = args.choice
        if args.tools:
            body["tools"], body["tool_choice"] = args.tools, args.tool_choice
            if not args.parallel_tool_calls:
                body["parallel_tool_calls"] = False
        return body

    def stream(self, args: abi.ChatArgs, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        """The server's stream chunks (parsed JSON), until `[DONE]` or cancellation."""
        try:
            with self.client.stream("POST", f"{self.base_url}/chat/completions",
                                    json=self.body(args),
                                    headers={"Accept": "text/event-stream"}) as resp:
                if isinstance(cancelled, Hangup):
                    stream = resp.extensions.get("network_stream")
                    cancelled.attach(stream.get_extra_info("socket") if stream else None)
                if resp.status_code != 200:
                    detail = _head(resp, 4096).decode(errors="replace")
                    status = resp.status_code
                    raise RemoteError(f"{self.base_url} answered {status}: {detail}",
                                      refused=400 <= status < 500 and status not in (
                                          401, 403, 404, 408, 429))
                lines = _lines(resp, self.base_url)
                for line in lines:
                    if cancelled.is_set():
                        return
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        _finish(resp, lines)
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        chunk = None
                    if not isinstance(chunk, dict):
                        raise RemoteError(f"{self.base_url} sent a malformed event")
                    if chunk.get("error"):  # how OpenAI-compatible servers fail a started stream
                        error = chunk["error"]
                        detail = error.get("message") if isinstance(error, dict) else error
                        raise RemoteError(f"{self.base_url} failed the request mid-stream: "
                                          f"{str(detail)[:500]}", reported=True)
                    yield chunk
                if not cancelled.is_set():
                    raise _Unfinished(f"{self.base_url} closed the stream before it finished "
                                      "(no [DONE]): the reply is cut short")
        except httpx.TimeoutException:
            if cancelled.is_set():
                return
            raise RemoteError(f"{self.base_url} sent nothing for {self.timeout:g} s",
                              timed_out=True) from None
        except httpx.ConnectError as exc:
            raise RemoteError(f"{self.base_url}: cannot connect: {exc}",
                              unreached=True) from None
        except (httpx.HTTPError, OSError) as exc:
            if cancelled.is_set():
                return  # its socket was shut by the cancellation
            raise RemoteError(f"{self.base_url}: {exc!r}") from None

    def run(self, args: abi.ChatArgs, cancelled: threading.Event,
            on_delta: Callable[[str], None]) -> tuple[str, str, list[abi.ToolCall], abi.Usage]:
        """Run one request to the end: (text, finish_reason, tool_calls, usage)."""
        text, finish, usage = [], None, abi.Usage(0, 0)
        calls: dict[int, dict[str, Any]] = {}
        try:
            for chunk in self.stream(args, cancelled):
                finish = self._take(chunk, text, calls, on_delta) or finish
                if chunk.get("usage"):
                    u = chunk["usage"]
                    usage = abi.Usage(int(u.get("prompt_tokens", 0)),
                                      int(u.get("completion_tokens", 0)))
        except _Unfinished:
            if finish is None:  # a server that ends without [DONE] after its finish is lenient
                raise
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise RemoteError(f"{self.base_url} sent a malformed event: {exc!r}") from None
        tool_calls = [abi.ToolCall(id=c["id"] or f"call_{i}", function=abi.FunctionCall(
            name=c["name"], arguments=c["args"] or "{}")) for i, c in sorted(calls.items())]
        if cancelled.is_set():
            finish = "cancelled"
        return "".join(text), finish or "stop", tool_calls, usage

    @staticmethod
    def _take(chunk: dict[str, Any], text: list[str], calls: dict[int, dict[str, Any]],
              on_delta: Callable[[str], None]) -> str | None:
        """Fold one chunk's choices into `text` and `calls`; its finish reason, if any."""
        finish = None
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text.append(delta["content"])
                on_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call.get("index", 0),
                                        {"id": "", "name": "", "args": ""})
                slot["id"] = call.get("id") or slot["id"]
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["args"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
        return finish

    def probe(self, timeout: float) -> bool:
        """Whether the server answers HTTP at all (`GET {base}/models`): any status but a
        server error. 501 counts as up: it is how a server without that route says so (the
        stdlib's http.server answers every GET it has no handler for with it)."""
        try:
            status = self.client.get(f"{self.base_url}/models", timeout=timeout).status_code
        except (httpx.HTTPError, OSError):
            return False
        return status < 500 or status == 501


def _head(resp: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of an error answer's body (a server may send a long one)."""
    got = b""
    for piece in resp.iter_bytes():
        got += piece
        if len(got) >= limit:
            break
    return got[:limit]


def _finish(resp: httpx.Response, lines: Iterator[bytes]) -> None:
    """Read a framed response (chunked, or of known length) to its end after `[DONE]`, so its
    connection goes back to the pool for the next request; at most REST_BYTES more. A stream
    that ends with the connection is closed anyway: nothing to read."""
    if "content-length" not in resp.headers and \
            resp.headers.get("transfer-encoding", "").lower() != "chunked":
        return
    rest = 0
    try:
        for line in lines:
            rest += len(line)
            if rest > REST_BYTES:
                return
    except (httpx.HTTPError, OSError, RemoteError):
        pass  # the reply is whole; only the connection is lost


def _lines(resp: httpx.Response, where: str) -> Iterator[bytes]:
    """The body's lines, each at most MAX_EVENT_BYTES: a broken or hostile server could send a
    line without end, and a whole line is held before it is parsed."""
    held = b""
    for piece in resp.iter_bytes():
        held += piece
        *lines, held = held.split(b"\n")
        yield from lines
        if len(held) > MAX_EVENT_BYTES:
            raise RemoteError(f"{where} sent an event over {MAX_EVENT_BYTES} bytes")
    if held:
        yield held
