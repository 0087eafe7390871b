"""The syscall ABI: typed, versioned wire messages shared by the kernel and every agent.

A call is one msgpack-encoded `Request` carrying the syscall name, a capability token and the
syscall's own argument struct (kept as raw msgpack so the kernel decodes it with the type its
syscall table names). The kernel answers with exactly one `Reply` or `Error` per request id.
Decoding is total: any byte string either becomes a valid message or raises `AbiError`, which the
kernel turns into `EINVAL`.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

ABI_VERSION = 1

# Hard ceilings, enforced on both sides; the kernel's transport also caps whole frames.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_TOKEN_CHARS = 8192
MAX_NAME_CHARS = 64


class ErrorCode(enum.IntEnum):
    """Typed syscall errors; numbered as their Linux errno namesakes."""

    EPERM = 1
    ENOENT = 2
    EIO = 5  # a fault inside the kernel, never the caller's; logged with a traceback
    EAGAIN = 11
    EBUSY = 16
    EINVAL = 22
    ENOSYS = 38
    EQUOTA = 122  # EDQUOT
    ECANCELED = 125
    ETIMEDOUT = 110


class AbiError(ValueError):
    """A byte string that is not a valid message; always answered with EINVAL."""


_EMPTY_ARGS = msgspec.msgpack.encode({})

CallName = Annotated[str, msgspec.Meta(min_length=3, max_length=64, pattern=r"^[a-z]+\.[a-z_]+$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS,
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TimeoutMs = Annotated[int, msgspec.Meta(ge=0, le=24 * 3600 * 1000)]


class Request(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """One syscall: `call` names it, `args` holds its argument struct as raw msgpack."""

    v: int
    id: RequestId
    call: CallName
    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_CHARS)]
    args: msgspec.Raw = msgspec.Raw(_EMPTY_ARGS)
    timeout_ms: TimeoutMs | None = None


class Reply(msgspec.Struct, array_like=True, tag="ok", frozen=True):
    id: int
    result: msgspec.Raw


class Error(msgspec.Struct, array_like=True, tag="err", frozen=True):
    id: int
    code: int
    message: str


class Chunk(msgspec.Struct, array_like=True, tag="chunk", frozen=True):
    """A piece of a streamed result; zero or more precede the call's one Reply or Error."""

    id: int
    data: msgspec.Raw


Response = Reply | Error | Chunk


# --- argument and result structs, one per syscall --------------------------------------------


class Args(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Base of every syscall argument struct: unknown fields are a caller bug (EINVAL)."""


class NoArgs(Args):
    pass


class AgentRef(Args):
    id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


class SpawnArgs(Args):
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    name: Name | None = None
    argv: Annotated[list[Annotated[str, msgspec.Meta(max_length=65536)]],
                    msgspec.Meta(max_length=256)] = []
    caps: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]],
                    msgspec.Meta(max_length=64)] = []
    # The sandbox tier (None: the kernel's default), restart policy and rlimit overrides
    # (names of kernel/proc/sandbox.py's Limits, plus log_bytes for the captured streams).
    sandbox: Annotated[str, msgspec.Meta(pattern=r"^(none|standard|strict)$")] | None = None
    restart: Annotated[str, msgspec.Meta(pattern=r"^(no|on-failure|always)$")] = "no"
    limits: Annotated[dict[Annotated[str, msgspec.Meta(max_length=32)],
                           Annotated[int, msgspec.Meta(ge=0, le=2**62)]],
                      msgspec.Meta(max_length=16)] = {}


class WaitArgs(Args):
    id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    timeout_ms: TimeoutMs | None = None


class KillArgs(Args):
    id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    grace_ms: TimeoutMs = 5000


class ExitArgs(Args):
    result: Any = None


class LogsArgs(Args):
    id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    stream: Annotated[str, msgspec.Meta(pattern=r"^(stdout|stderr)$")] = "stdout"
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=1024 * 1024)] = 65536


class SendArgs(Args):
    to: Name
    data: Any = None


class RecvArgs(Args):
    timeout_ms: TimeoutMs | None = None


class FunctionCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str  # JSON text, as in OpenAI's API


class ToolCall(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    function: FunctionCall
    type: str = "function"


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Annotated[str, msgspec.Meta(pattern=r"^(system|user|assistant|tool)$")]
    content: Annotated[str, msgspec.Meta(max_length=1024 * 1024)] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatArgs(Args):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=4096)]
    model: Name | None = None  # None: the kernel's default model
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.0  # 0 is greedy
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)] = 256
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]],
                    msgspec.Meta(max_length=16)] = []
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    response_format: Annotated[str, msgspec.Meta(pattern=r"^(text|json)$")] = "text"
    tools: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Annotated[str, msgspec.Meta(pattern=r"^(auto|none|required)$")] = "auto"
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0
    stream: bool = False


class CancelArgs(Args):
    request: RequestId  # the id of the caller's own in-flight call, on the same connection


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class ChatResult(msgspec.Struct, frozen=True, omit_defaults=True):
    model: str
    message: ChatMessage
    finish_reason: str  # stop | length | tool_calls | cancelled
    usage: Usage
    queued_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    preemptions: int = 0


class ChatDelta(msgspec.Struct, frozen=True):
    text: str


class ModelInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    backend: str  # local | openai
    device: str | None = None
    dtype: str | None = None
    default: bool = False


class AgentInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    id: int
    name: str
    state: str  # starting | running | suspended | restarting | exited | killed | failed | lost
    path: str
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_status: int | None = None
    result: Any = None
    sandbox: str | None = None  # the tier it runs in
    layers: str | None = None  # what the launcher applied, one line
    uid: int | None = None  # its own uid, in the tiers that give it one
    restart: str | None = None  # no | on-failure | always
    restarts: int = 0
    log_dropped: int = 0  # stdout+stderr bytes dropped over the log cap


class LogChunk(msgspec.Struct, frozen=True):
    data: bytes
    offset: int  # where the next read starts
    eof: bool  # the agent has ended and nothing more will be written


class Message(msgspec.Struct, frozen=True):
    sender: str
    sender_id: int | None
    data: Any
    sent_at: float


class Stats(msgspec.Struct, frozen=True):
    version: str
    abi: int
    pid: int
    uptime_s: float
    agents_running: int
    calls_parked: int  # syscalls waiting for an event (ipc.recv, proc.wait)
    syscalls: dict[str, int]
    errors: dict[str, int]
    models: dict[str, dict[str, float]] = {}  # per model: queue, batch, KV and engine counters


# --- codec -----------------------------------------------------------------------------------

# msgspec reports invalid UTF-8 in a str field as UnicodeDecodeError, not DecodeError.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)
_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_response_decoder = msgspec.msgpack.Decoder(Response)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_request(data: bytes) -> Request:
    """Decode and validate one request frame; any malformation raises AbiError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise AbiError("message too large")
    try:
        req = _request_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise AbiError(f"malformed request: {exc}") from None
    if req.v != ABI_VERSION:
        raise AbiError(f"unsupported ABI version {req.v} (kernel speaks {ABI_VERSION})")
    return req


def decode_args(raw: msgspec.Raw, kind: type[Args]) -> Args:
    try:
        return msgspec.msgpack.decode(raw, type=kind)
    except _DECODE_ERRORS as exc:
        raise AbiError(f"bad arguments: {exc}") from None


def decode_response(data: bytes) -> Reply | Error:
    try:
        return _response_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise AbiError(f"malformed response: {exc}") from None


def decode_result(raw: msgspec.Raw, kind: Any = Any) -> Any:
    try:
        return msgspec.msgpack.decode(raw, type=kind)
    except _DECODE_ERRORS as exc:
        raise AbiError(f"malformed result: {exc}") from None


def request_id_of(data: bytes) -> int:
    """Best-effort request id of a frame that failed to decode, so the error can be matched."""
    try:
        head = msgspec.msgpack.decode(data)
    except Exception:  # any garbage: there is no id to recover
        return 0
    if isinstance(head, list) and len(head) > 1 and isinstance(head[1], int):
        return head[1] if 0 <= head[1] < 2**63 else 0
    return 0
