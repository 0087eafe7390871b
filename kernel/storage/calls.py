"""The fs.* syscalls: handlers and the resource each acts on (`fs/agent/<owner>/<path>`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kernel.call import Call, Caller, Fault
from kernel.storage import paths
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Kernel

_ROOT_OK = {"fs.list", "fs.stat", "fs.search", "fs.share"}


def owner_of(k: Kernel, caller: Caller, owner: str | None) -> str:
    """The namespace a call acts in: the named owner's, else the calling agent's own (keyed by
    its name, so a restarted agent finds its files)."""
    if owner is not None:
        return owner
    if caller.agent_id is not None and caller.agent_id in k.procs.live:
        return k.procs.live[caller.agent_id].name
    if caller.principal.startswith("http:"):
        # An HTTP key's bearer has files of its own; agent names cannot hold ':', so this
        # owner is nobody else's (`fs/agent/http:NAME/...` in its rules).
        return caller.principal
    raise Fault(abi.ErrorCode.EINVAL, f"{caller.principal} has no file namespace of its own; "
                 "name an owner")


def _where(k: Kernel, caller: Caller, args: Any, root_ok: bool) -> tuple[str, str]:
    owner = owner_of(k, caller, args.owner if hasattr(args, "owner") else None)
    try:
        return owner, paths.clean(getattr(args, "path", ""), root_ok=root_ok)
    except paths.PathError as exc:
        raise Fault(exc.code, str(exc)) from None


def _resource(k: Kernel, args: Any, caller: Caller, root_ok: bool) -> str:
    owner, path = _where(k, caller, args, root_ok)
    try:
        return paths.resource(owner, path)
    except paths.PathError as exc:
        raise Fault(exc.code, str(exc)) from None


def path_resource(k: Kernel, args: Any, caller: Caller) -> str:
    """`fs/agent/OWNER/PATH` for calls on one file or directory."""
    return _resource(k, args, caller, root_ok=False)


def tree_resource(k: Kernel, args: Any, caller: Caller) -> str:
    """The same, for calls that may also name the namespace root ("")."""
    return _resource(k, args, caller, root_ok=True)


def _args(k: Kernel, call: Call, args: Any) -> tuple[str, str]:
    return _where(k, call.caller, args, call.name in _ROOT_OK)


def read(k: Kernel, call: Call, args: abi.FsReadArgs) -> bytes:
    return k.storage.read(*_args(k, call, args), args.version)


def write(k: Kernel, call: Call, args: abi.FsWriteArgs) -> abi.FsStat:
    return k.storage.write(*_args(k, call, args), args.data)


def append(k: Kernel, call: Call, args: abi.FsWriteArgs) -> abi.FsStat:
    return k.storage.append(*_args(k, call, args), args.data)


def list_(k: Kernel, call: Call, args: abi.FsPathArgs) -> list[abi.FsStat]:
    return k.storage.list(*_args(k, call, args))


def stat(k: Kernel, call: Call, args: abi.FsPathArgs) -> abi.FsStat:
    return k.storage.stat(*_args(k, call, args))


def delete(k: Kernel, call: Call, args: abi.FsPathArgs) -> Any:
    return k.storage.delete(call, *_args(k, call, args))


def mkdir(k: Kernel, call: Call, args: abi.FsPathArgs) -> abi.FsStat:
    return k.storage.mkdir(*_args(k, call, args))


def versions(k: Kernel, call: Call, args: abi.FsPathArgs) -> list[abi.FsVersion]:
    return k.storage.versions(*_args(k, call, args))


def rollback(k: Kernel, call: Call, args: abi.FsRollbackArgs) -> abi.FsStat:
    return k.storage.rollback(*_args(k, call, args), args.version, args.time)


def share(k: Kernel, call: Call, args: abi.FsShareArgs) -> str:
    owner, path = _args(k, call, args)
    return k.storage.share(call, owner, path, args.to, args.rights, args.expires_in_s)


def search(k: Kernel, call: Call, args: abi.FsSearchArgs) -> Any:
    owner = owner_of(k, call.caller, args.owner)
    return k.storage.search(call, owner, args.query, args.k)


def search_resource(k: Kernel, args: Any, caller: Caller) -> str:
    return paths.resource(owner_of(k, caller, args.owner), "")
