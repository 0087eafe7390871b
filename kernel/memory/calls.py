"""The memory.* syscalls: handlers and the resource each acts on (`mem/<namespace>`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kernel.call import Call, Caller, Fault
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Kernel


def own_namespace(k: Kernel, caller: Caller) -> str:
    """An agent's own namespace is keyed by its name, so a restarted agent finds its memories."""
    if caller.agent_id is not None:
        live = k.procs.live.get(caller.agent_id)
        if live is not None:
            return f"agent/{live.name}"
    # Users, HTTP keys and remote clients each have their own (`user/`, `http/`, `remote/`),
    # so an HTTP key named like a local user never shares its memories.
    kind, _, name = caller.principal.partition(":")
    if kind in ("user", "http", "remote") and name:
        return f"{kind}/{name}"
    raise Fault(abi.ErrorCode.EINVAL, f"{caller.principal} has no memory namespace of its "
                 "own; name one")


def _ns(k: Kernel, call: Call, args: Any) -> str:
    return args.namespace or own_namespace(k, call.caller)


def resource(k: Kernel, args: Any, caller: Caller) -> str:
    return f"mem/{args.namespace or own_namespace(k, caller)}"


def add(k: Kernel, call: Call, args: abi.MemoryAddArgs) -> Any:
    return k.memory.add(call, _ns(k, call, args), args.content, args.metadata)


def get(k: Kernel, call: Call, args: abi.MemoryRef) -> abi.Memory:
    return k.memory.get(_ns(k, call, args), args.id)


def update(k: Kernel, call: Call, args: abi.MemoryUpdateArgs) -> Any:
    return k.memory.update(call, _ns(k, call, args), args.id, args.content, args.metadata)


def delete(k: Kernel, call: Call, args: abi.MemoryRef) -> Any:
    namespace = _ns(k, call, args)
    k.memory.get(namespace, args.id)  # ENOENT before asking for approval

    def proceed() -> None:
        k.memory.get(namespace, args.id)  # still there when a human approved it
        k.memory.delete(namespace, args.id)

    return k.approvals.irreversible(call, "delete", f"mem/{namespace}/{args.id}", proceed)


def list_(k: Kernel, call: Call, args: abi.MemoryListArgs) -> list[abi.Memory]:
    return k.memory.list(_ns(k, call, args), args.after, args.limit, args.filter)


def search(k: Kernel, call: Call, args: abi.MemorySearchArgs) -> Any:
    return k.memory.search(call, _ns(k, call, args), args.query, args.k, args.filter, args.mode)



def embed(k: Kernel, call: Call, args: abi.EmbedArgs) -> Any:
    return k.memory.embed(call, list(args.input))
