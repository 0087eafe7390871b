"""The syscall table: every syscall, its handler, its argument type and the resource it touches.

The right a syscall needs is its own name (`proc.kill`), matched against the token's rules;
`resource` names what it acts on (`proc/7`, `ipc/bob`) for rules with a resource prefix.
Arguments arrive decoded and validated; handlers trust them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.access import syscalls as access
from kernel.memory import calls as memory_calls
from kernel.storage import calls as fs_calls
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Call, Caller, Kernel


@dataclass(frozen=True)
class Syscall:
    handler: Callable[[Kernel, Call, Any], Any]
    args: type[abi.Args] = abi.NoArgs
    resource: Callable[[Kernel, Any, Caller], str | None] | None = None


def _agent_only(call: Call) -> int:
    if call.caller.agent_id is None:
        from kernel.core import Fault

        raise Fault(abi.ErrorCode.EINVAL, f"{call.name} is for agents; {call.caller.principal} "
                    "is not one")
    return call.caller.agent_id


def sys_null(k: Kernel, call: Call, args: abi.NoArgs) -> None:
    return None


def sys_rings(k: Kernel, call: Call, args: abi.NoArgs) -> abi.RingTicket:
    return k.ringdoor.issue(call)


def sys_stats(k: Kernel, call: Call, args: abi.NoArgs) -> abi.Stats:
    """The whole kernel's figures for users and HTTP keys (`agentos top`, `/metrics`: both
    issued by a user); for an agent or a remote agent its own only: its caller row, its calls
    parked and its rings' counters, no other principal's usage, no kernel pid (0), no count of
    other agents (0)."""
    from kernel.core import VERSION

    uptime = round(time.time() - k.started_at, 3)
    principal = call.caller.principal
    if not principal.startswith(("user:", "http:")):
        return abi.Stats(version=VERSION, abi=abi.ABI_VERSION, pid=0, uptime_s=uptime,
                         agents_running=0, calls_parked=k.calls_parked(principal),
                         syscalls=k.rings.counts_of(call.caller.agent_id), errors={},
                         callers=k.accounts.own(principal))
    return abi.Stats(version=VERSION, abi=abi.ABI_VERSION, pid=os.getpid(), uptime_s=uptime,
                     agents_running=k.procs.running_count(), calls_parked=k.calls_parked(),
                     syscalls=dict(k.counts), models=k.llm.stats(),
                     errors=dict(k.errors), memory=k.memory.stats(),
                     **k.accounts.snapshot())


def proc_spawn(k: Kernel, call: Call, args: abi.SpawnArgs) -> int:
    k.access.check_group(call.capability, args.group)
    return k.procs.spawn(call.caller.principal, call.capability, args)


def proc_ps(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.AgentInfo]:
    return k.procs.ps()


def proc_info(k: Kernel, call: Call, args: abi.AgentRef) -> abi.AgentInfo:
    return k.procs.info(args.id)


def proc_wait(k: Kernel, call: Call, args: abi.WaitArgs) -> Any:
    return k.procs.wait(call, args)


def proc_kill(k: Kernel, call: Call, args: abi.KillArgs) -> None:
    k.procs.kill(call.caller.principal, args.id, args.grace_ms / 1000)


def proc_exit(k: Kernel, call: Call, args: abi.ExitArgs) -> None:
    k.procs.exit(_agent_only(call), args.result)


def proc_logs(k: Kernel, call: Call, args: abi.LogsArgs) -> abi.LogChunk:
    return k.procs.logs(args)


def proc_suspend(k: Kernel, call: Call, args: abi.AgentRef) -> None:
    k.procs.suspend(call.caller.principal, args.id)


def proc_resume(k: Kernel, call: Call, args: abi.AgentRef) -> None:
    k.procs.resume(call.caller.principal, args.id)


def ipc_send(k: Kernel, call: Call, args: abi.SendArgs) -> Any:
    k.access.charge(call, "bytes", lambda: len(msgspec.msgpack.encode(args.data)))
    return k.approvals.guarded(call, _ipc(k, args, call.caller), {"to": args.to},
                               lambda: k.ipc.send(call.caller, args))


def ipc_recv(k: Kernel, call: Call, args: abi.RecvArgs) -> Any:
    return k.ipc.recv(call, args)


def llm_chat(k: Kernel, call: Call, args: abi.ChatArgs) -> Any:
    k.access.reserve_llm(call, args.max_tokens)
    return k.llm.chat(call, args)


def llm_cancel(k: Kernel, call: Call, args: abi.CancelArgs) -> None:
    k.llm.cancel(call, args)


def llm_models(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.ModelInfo]:
    return k.llm.models()


def tools_list(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.ToolSpec]:
    return k.tools.list()


def tools_call(k: Kernel, call: Call, args: abi.ToolCallArgs) -> Any:
    return k.tools.call(call, args)


def tools_mount(k: Kernel, call: Call, args: abi.MountArgs) -> Any:
    return k.tools.mount(call, args)


def tools_unmount(k: Kernel, call: Call, args: abi.ToolRef) -> None:
    k.tools.unmount(call, args)


def tools_mounts(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.MountInfo]:
    return k.tools.mount_info()


def _proc(k: Kernel, args: Any, caller: Caller) -> str:
    return f"proc/{args.id}"


def _ipc(k: Kernel, args: Any, caller: Caller) -> str:
    return f"ipc/{args.to}"


def _model(k: Kernel, args: Any, caller: Caller) -> str:
    return f"llm/{args.model or k.config.default_model}"


def remote_add_key(k: Kernel, call: Call, args: abi.KeyArgs) -> abi.RemoteGrant:
    return k.remote.add_key(call, args)


def remote_keys(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.RemoteKey]:
    return k.remote.list_keys()


def remote_rm_key(k: Kernel, call: Call, args: abi.KeyRef) -> None:
    k.remote.rm_key(call, args)
def _tool(k: Kernel, args: Any, caller: Caller) -> str:
    return f"tool/{args.name}"


SYSCALLS: dict[str, Syscall] = {
    "sys.null": Syscall(sys_null),
    "sys.stats": Syscall(sys_stats),
    "sys.rings": Syscall(sys_rings),
    "proc.spawn": Syscall(proc_spawn, abi.SpawnArgs),
    "proc.ps": Syscall(proc_ps),
    "proc.info": Syscall(proc_info, abi.AgentRef, _proc),
    "proc.wait": Syscall(proc_wait, abi.WaitArgs, _proc),
    "proc.kill": Syscall(proc_kill, abi.KillArgs, _proc),
    "proc.exit": Syscall(proc_exit, abi.ExitArgs),
    "proc.logs": Syscall(proc_logs, abi.LogsArgs, _proc),
    "ipc.send": Syscall(ipc_send, abi.SendArgs, _ipc),
    "ipc.recv": Syscall(ipc_recv, abi.RecvArgs),
    "llm.chat": Syscall(llm_chat, abi.ChatArgs, _model),
    "llm.cancel": Syscall(llm_cancel, abi.CancelArgs),
    "llm.models": Syscall(llm_models),
    "remote.add_key": Syscall(remote_add_key, abi.KeyArgs),
    "remote.keys": Syscall(remote_keys),
    "remote.rm_key": Syscall(remote_rm_key, abi.KeyRef),
    "proc.suspend": Syscall(proc_suspend, abi.AgentRef, _proc),
    "proc.resume": Syscall(proc_resume, abi.AgentRef, _proc),
    "caps.delegate": Syscall(access.caps_delegate, abi.DelegateArgs),
    "caps.revoke": Syscall(access.caps_revoke, abi.RevokeArgs),
    "caps.inspect": Syscall(access.caps_inspect, abi.InspectArgs),
    "caps.list": Syscall(access.caps_list, abi.ListTokensArgs),
    "caps.rotate": Syscall(access.caps_rotate),
    "caps.export": Syscall(access.caps_export, abi.ExportArgs),
    "approvals.list": Syscall(access.approvals_list),
    "approvals.approve": Syscall(access.approvals_approve, abi.ApprovalRef),
    "approvals.deny": Syscall(access.approvals_deny, abi.ApprovalRef),
    "audit.read": Syscall(access.audit_read, abi.AuditArgs),
    "audit.verify": Syscall(access.audit_verify),
    "memory.add": Syscall(memory_calls.add, abi.MemoryAddArgs, memory_calls.resource),
    "memory.get": Syscall(memory_calls.get, abi.MemoryRef, memory_calls.resource),
    "memory.update": Syscall(memory_calls.update, abi.MemoryUpdateArgs, memory_calls.resource),
    "memory.delete": Syscall(memory_calls.delete, abi.MemoryRef, memory_calls.resource),
    "memory.list": Syscall(memory_calls.list_, abi.MemoryListArgs, memory_calls.resource),
    "memory.search": Syscall(memory_calls.search, abi.MemorySearchArgs, memory_calls.resource),
    "memory.embed": Syscall(memory_calls.embed, abi.EmbedArgs),
    "fs.read": Syscall(fs_calls.read, abi.FsReadArgs, fs_calls.path_resource),
    "fs.write": Syscall(fs_calls.write, abi.FsWriteArgs, fs_calls.path_resource),
    "fs.append": Syscall(fs_calls.append, abi.FsWriteArgs, fs_calls.path_resource),
    "fs.list": Syscall(fs_calls.list_, abi.FsPathArgs, fs_calls.tree_resource),
    "fs.stat": Syscall(fs_calls.stat, abi.FsPathArgs, fs_calls.tree_resource),
    "fs.delete": Syscall(fs_calls.delete, abi.FsPathArgs, fs_calls.path_resource),
    "fs.mkdir": Syscall(fs_calls.mkdir, abi.FsPathArgs, fs_calls.path_resource),
    "fs.versions": Syscall(fs_calls.versions, abi.FsPathArgs, fs_calls.path_resource),
    "fs.rollback": Syscall(fs_calls.rollback, abi.FsRollbackArgs, fs_calls.path_resource),
    "fs.share": Syscall(fs_calls.share, abi.FsShareArgs, fs_calls.tree_resource),
    "fs.search": Syscall(fs_calls.search, abi.FsSearchArgs, fs_calls.search_resource),
    "tools.list": Syscall(tools_list),
    "tools.call": Syscall(tools_call, abi.ToolCallArgs, _tool),
    "tools.mount": Syscall(tools_mount, abi.MountArgs, _tool),
    "tools.unmount": Syscall(tools_unmount, abi.ToolRef, _tool),
    "tools.mounts": Syscall(tools_mounts),
}

FAMILIES = {name.split(".")[0] for name in SYSCALLS}


def known_op(pattern: str) -> bool:
    """Whether a rule's op pattern names something that exists: `*`, `fam.*` or a syscall."""
    if pattern == "*":
        return True
    family, _, op = pattern.partition(".")
    return family in FAMILIES if op == "*" else pattern in SYSCALLS
