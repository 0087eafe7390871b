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


def sys_stats(k: Kernel, call: Call, args: abi.NoArgs) -> abi.Stats:
    from kernel.core import VERSION

    return abi.Stats(version=VERSION, abi=abi.ABI_VERSION, pid=os.getpid(),
                     uptime_s=round(time.time() - k.started_at, 3),
                     agents_running=k.procs.running_count(), calls_parked=len(k.parked),
                     syscalls=dict(k.counts), models=k.llm.stats(),
                     errors=dict(k.errors), **k.accounts.snapshot())


def proc_spawn(k: Kernel, call: Call, args: abi.SpawnArgs) -> int:
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


def ipc_send(k: Kernel, call: Call, args: abi.SendArgs) -> None:
    k.ipc.send(call.caller, args)


def ipc_recv(k: Kernel, call: Call, args: abi.RecvArgs) -> Any:
    return k.ipc.recv(call, args)


def llm_chat(k: Kernel, call: Call, args: abi.ChatArgs) -> Any:
    return k.llm.chat(call, args)


def llm_cancel(k: Kernel, call: Call, args: abi.CancelArgs) -> None:
    k.llm.cancel(call, args)


def llm_models(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.ModelInfo]:
    return k.llm.models()


def http_mint(k: Kernel, call: Call, args: abi.KeyArgs) -> str:
    from kernel.http.keys import mint

    return mint(k, call, args)


def _proc(k: Kernel, args: Any, caller: Caller) -> str:
    return f"proc/{args.id}"


def _ipc(k: Kernel, args: Any, caller: Caller) -> str:
    return f"ipc/{args.to}"


def _model(k: Kernel, args: Any, caller: Caller) -> str:
    return f"llm/{args.model or k.config.default_model}"


SYSCALLS: dict[str, Syscall] = {
    "sys.null": Syscall(sys_null),
    "sys.stats": Syscall(sys_stats),
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
    "http.mint": Syscall(http_mint, abi.KeyArgs),
}

FAMILIES = {name.split(".")[0] for name in SYSCALLS}


def known_op(pattern: str) -> bool:
    """Whether a rule's op pattern names something that exists: `*`, `fam.*` or a syscall."""
    if pattern == "*":
        return True
    family, _, op = pattern.partition(".")
    return family in FAMILIES if op == "*" else pattern in SYSCALLS
