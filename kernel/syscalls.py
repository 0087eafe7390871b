"""The kernel's half of the syscall table: each declared syscall's handler and resource.

`sdk/syscalls.py` declares every syscall once (name, argument struct, result type), for the
kernel and the SDK alike; here each name gets the handler that runs it and, where a rule may
narrow it to one, the function naming the resource it acts on (`proc/7`, `ipc/bob`). The right
a syscall needs is its own name (`proc.kill`), matched against the token's rules. A declared
syscall without a handler, or a handler for an undeclared one, stops the kernel at import.
Arguments arrive decoded (with the declared struct) and validated; handlers trust them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from kernel import VERSION
from kernel.access import syscalls as access
from kernel.call import Call, Caller, Fault
from kernel.memory import calls as memory_calls
from kernel.storage import calls as fs_calls
from sdk import abi
from sdk.syscalls import SIGNATURES, Signature

if TYPE_CHECKING:
    from kernel.core import Kernel

Handler = Callable[["Kernel", "Call", Any], Any]
Resource = Callable[["Kernel", Any, "Caller"], "str | None"]


@dataclass(frozen=True)
class Syscall:
    """One declared syscall bound to the kernel's code for it."""

    handler: Handler
    args: type[abi.Args]
    resource: Resource | None
    signature: Signature


def _agent_only(call: Call) -> int:
    if call.caller.agent_id is None:
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
    uptime = round(time.time() - k.started_at, 3)
    principal = call.caller.principal
    if not principal.startswith(("user:", "http:")):
        return abi.Stats(version=VERSION, abi=abi.ABI_VERSION, pid=0, uptime_s=uptime,
                         agents_running=0, calls_parked=k.calls.parked(principal),
                         syscalls=k.rings.counts_of(call.caller.agent_id), errors={},
                         callers=k.calls.accounts.own(principal))
    return abi.Stats(version=VERSION, abi=abi.ABI_VERSION, pid=os.getpid(), uptime_s=uptime,
                     agents_running=k.procs.running_count(), calls_parked=k.calls.parked(),
                     syscalls=dict(k.calls.counts), models=k.llm.stats(),
                     errors=dict(k.calls.errors), memory=k.memory.stats(),
                     dependencies=_dependencies(k), **k.calls.accounts.snapshot())


def _dependencies(k: Kernel) -> list[abi.DependencyInfo]:
    mounts = [abi.DependencyInfo("mcp", m.name, m.state, m.restarts, m.error)
              for m in k.tools.mount_info()]
    embedder = k.memory.dependency()
    return [*mounts, *([embedder] if embedder else []), *k.llm.dependencies()]


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
    return k.ipc.send(call.caller, args)


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
    return f"llm/{k.llm.resolve(args.model, args)}"


def remote_add_key(k: Kernel, call: Call, args: abi.KeyArgs) -> abi.RemoteGrant:
    return k.remote.add_key(call, args)


def remote_keys(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.RemoteKey]:
    return k.remote.list_keys()


def remote_rm_key(k: Kernel, call: Call, args: abi.KeyRef) -> None:
    k.remote.rm_key(call, args)


def _tool(k: Kernel, args: Any, caller: Caller) -> str:
    return f"tool/{args.name}"


@dataclass(frozen=True)
class Impl:
    """The kernel's code for one syscall: what runs it, and what it acts on (None: no rule
    may narrow it to a resource)."""

    handler: Handler
    resource: Resource | None = None


# In the order and grouping of sdk/syscalls.py's declaration.
IMPLS: dict[str, Impl] = {
    "sys.null": Impl(sys_null),
    "sys.stats": Impl(sys_stats),
    "sys.rings": Impl(sys_rings),
    "proc.spawn": Impl(proc_spawn),
    "proc.ps": Impl(proc_ps),
    "proc.info": Impl(proc_info, _proc),
    "proc.wait": Impl(proc_wait, _proc),
    "proc.kill": Impl(proc_kill, _proc),
    "proc.exit": Impl(proc_exit),
    "proc.logs": Impl(proc_logs, _proc),
    "proc.suspend": Impl(proc_suspend, _proc),
    "proc.resume": Impl(proc_resume, _proc),
    "ipc.send": Impl(ipc_send, _ipc),
    "ipc.recv": Impl(ipc_recv),
    "llm.chat": Impl(llm_chat, _model),
    "llm.cancel": Impl(llm_cancel),
    "llm.models": Impl(llm_models),
    "caps.delegate": Impl(access.caps_delegate),
    "caps.revoke": Impl(access.caps_revoke),
    "caps.inspect": Impl(access.caps_inspect),
    "caps.list": Impl(access.caps_list),
    "caps.rotate": Impl(access.caps_rotate),
    "caps.export": Impl(access.caps_export),
    "approvals.list": Impl(access.approvals_list),
    "approvals.approve": Impl(access.approvals_approve),
    "approvals.deny": Impl(access.approvals_deny),
    "audit.read": Impl(access.audit_read),
    "audit.verify": Impl(access.audit_verify),
    "memory.add": Impl(memory_calls.add, memory_calls.resource),
    "memory.get": Impl(memory_calls.get, memory_calls.resource),
    "memory.update": Impl(memory_calls.update, memory_calls.resource),
    "memory.delete": Impl(memory_calls.delete, memory_calls.resource),
    "memory.list": Impl(memory_calls.list_, memory_calls.resource),
    "memory.search": Impl(memory_calls.search, memory_calls.resource),
    "memory.embed": Impl(memory_calls.embed),
    "fs.read": Impl(fs_calls.read, fs_calls.path_resource),
    "fs.write": Impl(fs_calls.write, fs_calls.path_resource),
    "fs.append": Impl(fs_calls.append, fs_calls.path_resource),
    "fs.list": Impl(fs_calls.list_, fs_calls.tree_resource),
    "fs.stat": Impl(fs_calls.stat, fs_calls.tree_resource),
    "fs.delete": Impl(fs_calls.delete, fs_calls.path_resource),
    "fs.mkdir": Impl(fs_calls.mkdir, fs_calls.path_resource),
    "fs.versions": Impl(fs_calls.versions, fs_calls.path_resource),
    "fs.rollback": Impl(fs_calls.rollback, fs_calls.path_resource),
    "fs.share": Impl(fs_calls.share, fs_calls.tree_resource),
    "fs.search": Impl(fs_calls.search, fs_calls.search_resource),
    "tools.list": Impl(tools_list),
    "tools.call": Impl(tools_call, _tool),
    "tools.mount": Impl(tools_mount, _tool),
    "tools.unmount": Impl(tools_unmount, _tool),
    "tools.mounts": Impl(tools_mounts),
    "remote.add_key": Impl(remote_add_key),
    "remote.keys": Impl(remote_keys),
    "remote.rm_key": Impl(remote_rm_key),
}


def bind(impls: dict[str, Impl]) -> dict[str, Syscall]:
    """Join each declared syscall to its code; the two lists must name the same syscalls."""
    missing, undeclared = SIGNATURES.keys() - impls.keys(), impls.keys() - SIGNATURES.keys()
    if missing or undeclared:
        raise RuntimeError(f"the kernel's syscall table disagrees with sdk/syscalls.py: no "
                           f"handler for {sorted(missing)}, no declaration of {sorted(undeclared)}")
    return {name: Syscall(impls[name].handler, s.args, impls[name].resource, s)
            for name, s in SIGNATURES.items()}


SYSCALLS: dict[str, Syscall] = bind(IMPLS)
