"""The syscall signature table: every syscall declared once, for the kernel and the SDK alike.

As xv6's `syscall.h` is shared by kernel and user space, this table is the one list of
syscalls: each one's name, argument struct, result type, stream chunk type (for calls that
stream) and the resource a rule may name. `kernel/syscalls.py` binds a handler to each entry
and refuses to start if the two lists differ; the SDK's families (`Family` below) send calls
by these names and decode their results with these types; `known_op` validates the op of a
capability rule against it. `docs/abi.md`'s syscall table is generated from it
(`python tools/abidoc.py`).

The right a syscall needs is its own name; `resource` is the form of what it acts on
(`proc/ID`), which a rule `OP@RESOURCE` may narrow it to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdk import abi

# Who makes a syscall: a method of an SDK family, only the CLI (`userland/`), or the SDK's
# connection itself (not something an agent asks for by name).
SDK, CLI, CONNECTION = "sdk", "cli", "connection"


@dataclass(frozen=True)
class Signature:
    name: str  # family.op
    args: type[abi.Args]
    result: Any  # the type its Reply's result decodes to; None: it returns nothing
    chunk: Any = None  # the type of each Chunk it streams; None: it never streams
    resource: str | None = None  # the form of the resource it acts on, e.g. "proc/ID"
    agent_only: bool = False  # refused (EINVAL) to a caller that is not an agent
    made_by: str = SDK

    @property
    def family(self) -> str:
        return self.name.partition(".")[0]


def _table(*signatures: Signature) -> dict[str, Signature]:
    table: dict[str, Signature] = {}
    for s in signatures:
        if s.name in table:
            raise ValueError(f"syscall {s.name} declared twice")
        table[s.name] = s
    return table


_PROC, _FS, _MEM = "proc/ID", "fs/agent/OWNER/PATH", "mem/NAMESPACE"

SIGNATURES: dict[str, Signature] = _table(
    # sys: liveness, statistics, the shared-memory rings
    Signature("sys.null", abi.NoArgs, None),
    Signature("sys.stats", abi.NoArgs, abi.Stats),
    Signature("sys.rings", abi.NoArgs, abi.RingTicket, made_by=CONNECTION),
    # proc: agent processes
    Signature("proc.spawn", abi.SpawnArgs, int),
    Signature("proc.ps", abi.NoArgs, list[abi.AgentInfo]),
    Signature("proc.info", abi.AgentRef, abi.AgentInfo, resource=_PROC),
    Signature("proc.wait", abi.WaitArgs, abi.AgentInfo, resource=_PROC),
    Signature("proc.kill", abi.KillArgs, None, resource=_PROC),
    Signature("proc.exit", abi.ExitArgs, None, agent_only=True),
    Signature("proc.logs", abi.LogsArgs, abi.LogChunk, resource=_PROC),
    Signature("proc.suspend", abi.AgentRef, None, resource=_PROC),
    Signature("proc.resume", abi.AgentRef, None, resource=_PROC),
    # ipc: durable, bounded mailboxes between agents
    Signature("ipc.send", abi.SendArgs, None, resource="ipc/NAME"),
    Signature("ipc.recv", abi.RecvArgs, abi.Message, agent_only=True),
    # llm: chat completions from the kernel's scheduled models
    Signature("llm.chat", abi.ChatArgs, abi.ChatResult, chunk=abi.ChatDelta,
              resource="llm/MODEL"),
    Signature("llm.cancel", abi.CancelArgs, None),
    Signature("llm.models", abi.NoArgs, list[abi.ModelInfo]),
    # caps, approvals, audit: the access manager
    Signature("caps.delegate", abi.DelegateArgs, abi.Grant),
    Signature("caps.revoke", abi.RevokeArgs, int),
    Signature("caps.inspect", abi.InspectArgs, abi.TokenInfo),
    Signature("caps.list", abi.ListTokensArgs, list[abi.TokenInfo]),
    Signature("caps.rotate", abi.NoArgs, None),
    Signature("caps.export", abi.ExportArgs, abi.Exported),
    Signature("approvals.list", abi.NoArgs, list[abi.ApprovalInfo]),
    Signature("approvals.approve", abi.ApprovalRef, None),
    Signature("approvals.deny", abi.ApprovalRef, None),
    Signature("audit.read", abi.AuditArgs, list[abi.AuditRecord]),
    Signature("audit.verify", abi.AuditVerifyArgs, abi.AuditReport),
    # memory: memories searched by meaning, per namespace
    Signature("memory.add", abi.MemoryAddArgs, int, resource=_MEM),
    Signature("memory.get", abi.MemoryRef, abi.Memory, resource=_MEM),
    Signature("memory.update", abi.MemoryUpdateArgs, None, resource=_MEM),
    Signature("memory.delete", abi.MemoryRef, None, resource=_MEM),
    Signature("memory.list", abi.MemoryListArgs, list[abi.Memory], resource=_MEM),
    Signature("memory.search", abi.MemorySearchArgs, list[abi.MemoryHit], resource=_MEM),
    Signature("memory.embed", abi.EmbedArgs, abi.EmbedResult),
    # fs: versioned files, per agent
    Signature("fs.read", abi.FsReadArgs, bytes, resource=_FS),
    Signature("fs.write", abi.FsWriteArgs, abi.FsStat, resource=_FS),
    Signature("fs.append", abi.FsWriteArgs, abi.FsStat, resource=_FS),
    Signature("fs.list", abi.FsPathArgs, list[abi.FsStat], resource=_FS),
    Signature("fs.stat", abi.FsPathArgs, abi.FsStat, resource=_FS),
    Signature("fs.delete", abi.FsPathArgs, None, resource=_FS),
    Signature("fs.mkdir", abi.FsPathArgs, abi.FsStat, resource=_FS),
    Signature("fs.versions", abi.FsPathArgs, list[abi.FsVersion], resource=_FS),
    Signature("fs.rollback", abi.FsRollbackArgs, abi.FsStat, resource=_FS),
    Signature("fs.share", abi.FsShareArgs, str, resource=_FS),
    Signature("fs.search", abi.FsSearchArgs, list[abi.FsHit], resource="fs/agent/OWNER"),
    # tools: built-in, file and MCP tools
    Signature("tools.list", abi.NoArgs, list[abi.ToolSpec]),
    Signature("tools.call", abi.ToolCallArgs, abi.ToolResult, resource="tool/NAME"),
    Signature("tools.mount", abi.MountArgs, list[str], resource="tool/NAME"),
    Signature("tools.unmount", abi.ToolRef, None, resource="tool/NAME"),
    Signature("tools.mounts", abi.NoArgs, list[abi.MountInfo]),
    # remote: CURVE keys of remote agents (`agentos agent add-key/keys/rm-key`)
    Signature("remote.add_key", abi.KeyArgs, abi.RemoteGrant, made_by=CLI),
    Signature("remote.keys", abi.NoArgs, list[abi.RemoteKey], made_by=CLI),
    Signature("remote.rm_key", abi.KeyRef, None, made_by=CLI),
)

# Rights a kernel service checks on its own, not syscalls an agent makes by name: the egress
# proxy (kernel/doors/egress.py) checks `net.connect` on every connection it opens.
RIGHTS: dict[str, str] = {"net.connect": "net/HOST:PORT"}

FAMILIES = frozenset(s.family for s in SIGNATURES.values()) | {
    r.partition(".")[0] for r in RIGHTS}


def known_op(pattern: str) -> bool:
    """Whether a rule's op pattern names something that exists: `*`, `fam.*` or a syscall."""
    if pattern == "*":
        return True
    family, _, op = pattern.partition(".")
    return family in FAMILIES if op == "*" else pattern in SIGNATURES or pattern in RIGHTS


class Family:
    """Base of the SDK's syscall families (`conn.fs`, `conn.llm`, ...): each call goes out by
    its declared name and its result is decoded with its declared type."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn  # a Connection, an AsyncConnection or a Batch: anything with `call`

    def _call(self, name: str, args: abi.Args | None = None, **wait: Any) -> Any:
        return self._conn.call(name, args, SIGNATURES[name].result, **wait)

    def _stream(self, name: str, args: abi.Args, **wait: Any) -> Any:
        s = SIGNATURES[name]
        return self._conn.stream(name, args, s.chunk, s.result, **wait)
