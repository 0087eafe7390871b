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
    ENOSPC = 28  # the kernel's disk is full: nothing was written; retry once space returns
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
    group: Name | None = None  # a privilege group ([groups.NAME]) whose template is granted too
    # The agent's default model (a served name or alias): set in its environment as
    # AGENTOS_MODEL, OPENAI_MODEL and OPENAI_DEFAULT_MODEL; refused (ENOENT) if not served.
    model: Name | None = None
    # A Python virtual environment (absolute path, built outside the sandbox: `agentos run
    # --requirements`) whose interpreter runs the agent, bound read-only into its sandbox.
    venv: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)] | None = None


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
    # What the output must match, enforced token by token (grammar-constrained decoding; at
    # most one): a JSON Schema, a regular expression, or one of a list of strings. Tool calls
    # are enforced too: "required" always yields calls whose arguments fit their tool's schema.
    json_schema: dict[str, Any] | None = None
    regex: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)] | None = None
    choice: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]],
                      msgspec.Meta(min_length=1, max_length=1024)] | None = None
    parallel_tool_calls: bool = True  # False: at most one call per reply
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0
    stream: bool = False
    ignore_eos: bool = False  # generate max_tokens whatever the model says (vLLM's extension)
    # The last message is the assistant's unfinished reply: go on with it rather than start a
    # new one (vLLM's `continue_final_message`); how a fleet resumes a greedy call elsewhere.
    continue_final: bool = False


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
    backend: str  # local | openai | route (a name that picks one of `picks` per call)
    device: str | None = None
    dtype: str | None = None  # as configured: float32 | bfloat16 | float16 | auto
    default: bool = False
    aliases: list[str] = []  # other names it answers to (kernel config `[aliases]`)
    # What the loaded model computes in (`auto` resolved for its device); None until it has
    # loaded, and for a remote model.
    running_dtype: str | None = None
    stored: str | None = None  # its model-store name; None: a directory, a .gguf or a server
    picks: list[str] = []  # a route's models, in its rules' order (kernel config `[routes]`)


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
    model: str | None = None  # its default model (`agentos run --model`)
    venv: str | None = None  # the virtual environment that runs it


class LogChunk(msgspec.Struct, frozen=True):
    data: bytes
    offset: int  # where the next read starts
    eof: bool  # the agent has ended and nothing more will be written


class Message(msgspec.Struct, frozen=True):
    sender: str
    sender_id: int | None
    data: Any
    sent_at: float


# Upper bounds (seconds) of the syscall latency histogram buckets; a last bucket is +Inf.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Latency(msgspec.Struct, frozen=True):
    """One syscall family's latency histogram: counts per LATENCY_BUCKETS bucket, +Inf last."""

    buckets: list[int]
    sum_s: float


class RingTicket(msgspec.Struct, frozen=True):
    """`sys.rings`: present `ticket` on the Unix socket at `path` to receive the rings' fds."""

    ticket: str
    path: str


class DependencyInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """Something the kernel serves through that can fail on its own: an MCP server, the
    embedding worker, a model (loaded from the cache, or a remote server)."""

    kind: str  # mcp | embedder | model
    name: str
    # ready | starting | restarting | failed (mcp, embedder); unloaded | loading | ready |
    # failed | unhealthy (models: a remote server that broke, probed until it answers)
    state: str
    restarts: int = 0  # restarts (mcp, embedder), loads tried (local model), outages (remote)
    error: str | None = None  # why it last failed


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
    memory: dict[str, float] = {}  # the memory manager's RAM tier and embedding counters
    latency: dict[str, Latency] = {}  # per syscall family
    denials: dict[str, int] = {}  # access-check refusals (EPERM) per syscall family
    callers: dict[str, dict[str, float]] = {}  # per principal: syscalls, errors, tokens used
    llm_usage: dict[str, dict[str, float]] = {}  # per model: calls, tokens, tokens_per_s
    dependencies: list[DependencyInfo] = []  # MCP servers, the embedder, models: their state


# --- remote agents (CURVE keys on the kernel's tcp:// endpoint) ----------------------------

Z85Key = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")]


class KeyArgs(Args):
    name: Name
    key: Z85Key  # the client's CURVE public key
    caps: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]],
                    msgspec.Meta(max_length=64)] = []


class KeyRef(Args):
    name: Name


class RemoteKey(msgspec.Struct, frozen=True):
    name: str
    key: str
    principal: str


class RemoteGrant(msgspec.Struct, frozen=True):
    """What a remote client needs: where to connect, the server's key, and its token."""

    principal: str
    endpoint: str | None  # None: the kernel is not listening on tcp:// (boot --listen)
    server_key: str
    token: str
# --- access manager: capabilities, approvals, audit ------------------------------------------

TokenId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
RuleText = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class DelegateArgs(Args):
    """Mint a child of a token the caller holds (its own by default), narrower than it."""

    to: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]  # agent name or principal
    caps: Annotated[list[RuleText], msgspec.Meta(max_length=64)] = []  # default: the parent's
    group: Name | None = None
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=10 * 365 * 86400)] | None = None
    budgets: dict[str, Annotated[int, msgspec.Meta(ge=0, le=2**53)]] = {}
    once: bool = False
    requires_approval: Annotated[list[RuleText], msgspec.Meta(max_length=64)] = []
    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_CHARS)] | None = None


class Grant(msgspec.Struct, frozen=True, omit_defaults=True):
    token: str
    id: str
    audience: str
    expires_at: float | None = None


class RevokeArgs(Args):
    id: TokenId


class InspectArgs(Args):
    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_CHARS)] | None = None  # default: own


class TokenInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    subject: str
    issued_at: float
    parent: str | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    caveats: list[str] = []  # human-readable, e.g. "allow proc.info@proc/3"
    budgets: dict[str, list[int]] = {}  # kind -> [used, limit]


class ListTokensArgs(Args):
    subject: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    all: bool = False  # include revoked and expired tokens
    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 1000


class ExportArgs(Args):
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0


class Exported(msgspec.Struct, frozen=True):
    token: str  # "aosx1.<claims>.<signature>", verifiable with the public key alone
    public_key: str  # Ed25519, hex


class ApprovalRef(Args):
    id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class ApprovalInfo(msgspec.Struct, frozen=True):
    id: int
    principal: str  # who asked
    action: str
    detail: dict[str, Any]
    requested_at: float
    deadline: float


class AuditArgs(Args):
    since: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 1000


class AuditVerifyArgs(Args):
    # False: only the rows added since the last intact verify (its checkpoint row must still
    # hash the same); True: every row from the genesis.
    full: bool = True


class AuditRecord(msgspec.Struct, frozen=True):
    seq: int
    ts: float
    principal: str
    event: str
    detail: dict[str, Any]


class AuditReport(msgspec.Struct, frozen=True, omit_defaults=True):
    rows: int
    intact: bool
    broken_at: int | None = None  # the seq of the first row whose chain is broken
    anchored_seq: int = 0  # the newest seq recorded outside the database


# --- tools ------------------------------------------------------------------------------------

ToolName = Annotated[str, msgspec.Meta(min_length=1, max_length=128,
                                       pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class ToolCallArgs(Args):
    name: ToolName
    arguments: Any = {}  # checked against the tool's JSON Schema (EINVAL names the problem)


class ToolRef(Args):
    name: ToolName


class MountArgs(Args):
    """Mount an MCP server (stdio): its tools appear as `<name>.<tool>`."""

    name: Name
    command: Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]],
                       msgspec.Meta(min_length=1, max_length=64)]
    network: bool = False  # run the server without the network filters


class ToolSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    description: str
    parameters: dict[str, Any]
    side_effect: str  # read-only | writes | destructive | network
    concurrency: int
    timeout_s: float
    source: str  # builtin | a tool file | mcp:<mount>
    result: dict[str, Any] | None = None
    resources: dict[str, str] = {}


class ToolResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """A finished tool call. `error` set: the tool itself failed (it raised, crashed or
    refused); the kernel's own refusals are syscall errors instead."""

    name: str
    value: Any = None
    error: str | None = None
    stdout: str = ""  # what the tool printed, capped
    tool_ms: float = 0.0  # the tool's own time, measured inside the tool process
    total_ms: float = 0.0  # from the kernel receiving the call to the result


class MountInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    command: list[str]
    state: str  # starting | ready | restarting (its server died) | failed
    tools: list[str] = []
    error: str | None = None
    restarts: int = 0  # restarts in a row after its server died


# --- codec -----------------------------------------------------------------------------------

# msgspec reports invalid UTF-8 in a str field as UnicodeDecodeError, not DecodeError.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)
_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_response_decoder = msgspec.msgpack.Decoder(Response)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def encode_reply(request_id: int, result: Any) -> bytes:
    """`encode(Reply(request_id, Raw(encode(result))))` in one pass: a Reply is the array
    ["ok", id, result], so encoding that tuple gives the same bytes without encoding the
    result twice (tests/sdk/test_abi.py holds the two equal)."""
    return _encoder.encode(("ok", request_id, result))


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


# One decoder per type: `msgspec.msgpack.decode(raw, type=kind)` rebuilds its type description
# on every call (~0.8 µs even for `None`, more for containers of structs), which costs more
# than most decodes. The types come from the signature table, so the cache stays small; it is
# bounded anyway for callers that decode types of their own.
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}
_DECODERS_MAX = 1024


def _decoder(kind: Any) -> msgspec.msgpack.Decoder:
    try:
        return _decoders[kind]
    except KeyError:
        decoder = msgspec.msgpack.Decoder(kind)
        if len(_decoders) < _DECODERS_MAX:
            _decoders[kind] = decoder
        return decoder
    except TypeError:  # an unhashable annotation: built each time
        return msgspec.msgpack.Decoder(kind)


def decode_args(raw: msgspec.Raw, kind: type[Args]) -> Args:
    decoder = _decoder(kind)
    try:
        return decoder.decode(raw)
    except _DECODE_ERRORS as exc:
        raise AbiError(f"bad arguments: {exc}") from None


def decode_response(data: bytes) -> Reply | Error:
    try:
        return _response_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise AbiError(f"malformed response: {exc}") from None


def decode_result(raw: msgspec.Raw, kind: Any = Any) -> Any:
    decoder = _decoder(kind)
    try:
        return decoder.decode(raw)
    except _DECODE_ERRORS as exc:
        raise AbiError(f"malformed result: {exc}") from None


def request_id_of(data: bytes) -> int:
    """Best-effort request id of a frame that failed to decode, so the error can be matched."""
    try:
        head = msgspec.msgpack.decode(data)
    except Exception:  # any garbage: there is no id to recover
        return 0
    if isinstance(head, list) and len(head) > 1:
        rid = head[1]
        # bool is an int subclass: echoing `False` back as an id makes the reply undecodable.
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63:
            return rid
    return 0


# --- memory and fs (appended: the memory and storage managers) -------------------------------

# A memory namespace: an agent's own is `agent/<name>` (the default), others are shared by
# capability (`memory.search@mem/team`).
Namespace = Annotated[str, msgspec.Meta(
    min_length=1, max_length=128,
    pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*){0,3}$")]
MemoryId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Scalar = str | int | float | bool | None
Filter = Annotated[dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]{1,64}$")], Scalar],
                   msgspec.Meta(max_length=16)]


class MemoryAddArgs(Args):
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=1024 * 1024)]
    metadata: dict[str, Any] = {}
    namespace: Namespace | None = None


class MemoryRef(Args):
    id: MemoryId
    namespace: Namespace | None = None


class MemoryUpdateArgs(Args):
    id: MemoryId
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=1024 * 1024)] | None = None
    metadata: dict[str, Any] | None = None
    namespace: Namespace | None = None


class MemoryListArgs(Args):
    namespace: Namespace | None = None
    after: Annotated[int, msgspec.Meta(ge=0)] = 0  # ids greater than this, ascending
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    filter: Filter = {}


class MemorySearchArgs(Args):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    filter: Filter = {}  # metadata key == value, all must hold
    namespace: Namespace | None = None
    mode: Annotated[str, msgspec.Meta(pattern=r"^(auto|vector|keyword)$")] = "auto"


class Memory(msgspec.Struct, frozen=True):
    id: int
    namespace: str
    content: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float


class MemoryHit(msgspec.Struct, frozen=True):
    id: int
    namespace: str
    content: str
    metadata: dict[str, Any]
    score: float
    match: str  # vector | keyword


class EmbedArgs(Args):
    """Texts to embed with the memory manager's embedder (`/v1/embeddings`)."""

    input: Annotated[list[Annotated[str, msgspec.Meta(max_length=64 * 1024)]],
                     msgspec.Meta(min_length=1, max_length=2048)]


class EmbedResult(msgspec.Struct, frozen=True):
    model: str  # the embedder's name (all-minilm-l6-v2, or hash in tests)
    vectors: list[list[float]]  # unit length, one per input, in order
    words: int  # whitespace-separated words embedded (a stand-in for tokens)


FsPathText = Annotated[str, msgspec.Meta(max_length=1024)]  # checked by the kernel


class FsPathArgs(Args):
    path: FsPathText = ""  # "": the namespace root (fs.list, fs.stat)
    owner: Name | None = None  # whose namespace: the caller's own by default


class FsReadArgs(Args):
    path: FsPathText
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    owner: Name | None = None


class FsWriteArgs(Args):
    path: FsPathText
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_MESSAGE_BYTES)]
    owner: Name | None = None


class FsRollbackArgs(Args):
    path: FsPathText
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    time: float | None = None  # the version current at this Unix time
    owner: Name | None = None


class FsShareArgs(Args):
    path: FsPathText
    to: Name
    rights: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"^fs\.[a-z_]+$")]],
                      msgspec.Meta(min_length=1, max_length=16)] = msgspec.field(
                          default_factory=lambda: ["fs.read"])
    expires_in_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    owner: Name | None = None  # re-sharing another's file needs fs.share on it


class FsSearchArgs(Args):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    owner: Name | None = None


class FsStat(msgspec.Struct, frozen=True, omit_defaults=True):
    path: str
    kind: str  # file | dir
    size: int = 0
    version: int = 0
    modified_at: float = 0.0
    sha256: str | None = None


class FsVersion(msgspec.Struct, frozen=True):
    version: int
    size: int
    sha256: str
    created_at: float
    op: str  # write | append | rollback


class FsHit(msgspec.Struct, frozen=True):
    path: str
    score: float
    snippet: str
