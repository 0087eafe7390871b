"""AIOS's memory, storage and tool queries onto the memory.*, fs.* and tools.* syscalls.

`query_data` is `{operation_type, params}` (Cerebrum at HEAD: `MemoryQuery`, `StorageQuery`) or,
from aios-agent-sdk 0.0.3, `{operation_type, messages}` whose last message holds the fields;
tool queries are `{tool_calls: [{name, parameters}]}`. Every operation is one or two ordinary
syscalls made as the token's principal, so its rules decide as for any caller: an HTTP key's
own space is memory namespace `http/<name>` and file owner `http:<name>`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from kernel.doors.http.bridge import Refused
from sdk import abi

# One syscall: (name, args, result type) -> its decoded result (raises Refused/Failed).
Call = Callable[[str, abi.Args | None, Any], Awaitable[Any]]


def _convert(fields: dict[str, Any], kind: type[abi.Args]) -> abi.Args:
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, kind)
    except msgspec.ValidationError as exc:
        raise Refused(400, f"invalid query_data: {exc}") from None


def _operation(data: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise Refused(400, "query_data must be an object")
    op = data.get("operation_type")
    params = data.get("params")
    if params is None:  # aios-agent-sdk 0.0.3: the fields ride in the last message
        messages = data.get("messages")
        params = messages[-1] if isinstance(messages, list) and messages else {}
    if not isinstance(op, str) or not isinstance(params, dict):
        raise Refused(400, "query_data needs operation_type and params (an object)")
    return op, params


def _need(params: dict[str, Any], *names: str) -> Any:
    for name in names:
        if params.get(name) is not None:
            return params[name]
    raise Refused(400, f"query_data.params.{names[0]} is required")


# --- memory ---------------------------------------------------------------------------------

async def memory(data: Any, call: Call) -> dict[str, Any]:
    op, p = _operation(data)
    ns = p.get("namespace")
    if op == "add_memory":
        args = _convert({"content": _need(p, "content"), "metadata": p.get("metadata"),
                         "namespace": ns}, abi.MemoryAddArgs)
        return {"memory_id": await call("memory.add", args, int)}
    if op == "get_memory":
        ref = _convert({"id": _need(p, "memory_id", "id"), "namespace": ns}, abi.MemoryRef)
        m = await call("memory.get", ref, abi.Memory)
        return {"memory_id": m.id, "content": m.content, "metadata": m.metadata}
    if op == "update_memory":
        args = _convert({"id": _need(p, "memory_id", "id"), "content": p.get("content"),
                         "metadata": p.get("metadata"), "namespace": ns}, abi.MemoryUpdateArgs)
        await call("memory.update", args, Any)
        return {"memory_id": args.id}
    if op in ("remove_memory", "delete_memory"):
        ref = _convert({"id": _need(p, "memory_id", "id"), "namespace": ns}, abi.MemoryRef)
        await call("memory.delete", ref, Any)
        return {"memory_id": ref.id}
    if op in ("retrieve_memory", "retrieve_memory_raw", "search_memories"):
        args = _convert({"query": _need(p, "query", "content"), "k": p.get("k"),
                         "namespace": ns}, abi.MemorySearchArgs)
        hits = await call("memory.search", args, list[abi.MemoryHit])
        return {"search_results": [{"memory_id": h.id, "content": h.content,
                                    "metadata": h.metadata, "score": h.score} for h in hits]}
    if op == "add_agentic_memory":
        raise Refused(501, "add_agentic_memory (A-MEM's LLM-driven notes) is not supported; "
                      "use add_memory")
    raise Refused(400, f"unknown memory operation_type {op!r}")


# --- storage --------------------------------------------------------------------------------

def _path(p: dict[str, Any]) -> str:
    path = _need(p, "file_path", "dir_path", "path")
    if not isinstance(path, str):
        raise Refused(400, "query_data.params.file_path must be a string")
    return path


async def storage(data: Any, call: Call) -> dict[str, Any]:
    op, p = _operation(data)
    if op == "mount":  # namespaces are virtual and always there: check the caller may use it
        await call("fs.stat", _convert({}, abi.FsPathArgs), abi.FsStat)
        return {"response_message": "mounted your file namespace"}
    if op in ("create_file", "write"):
        content = p.get("content", "")
        blob = content.encode() if isinstance(content, str) else content
        st = await call("fs.write", _convert({"path": _path(p), "data": blob},
                                             abi.FsWriteArgs), abi.FsStat)
        return {"response_message": f"wrote {st.path} (version {st.version}, {st.size} bytes)"}
    if op == "create_dir":
        st = await call("fs.mkdir", _convert({"path": _path(p)}, abi.FsPathArgs), abi.FsStat)
        return {"response_message": f"created directory {st.path}"}
    if op == "read":  # not in AIOS (its agents read files through the LLM); agentos has it
        raw = await call("fs.read", _convert({"path": _path(p), "version": p.get("version")},
                                             abi.FsReadArgs), bytes)
        return {"response_message": raw.decode("utf-8", errors="replace")}
    if op in ("list", "list_dir"):
        stats = await call("fs.list", _convert({"path": p.get("dir_path", p.get("path", ""))},
                                               abi.FsPathArgs), list[abi.FsStat])
        return {"response_message": [msgspec.to_builtins(s) for s in stats]}
    if op in ("delete_file", "delete_dir", "delete"):
        await call("fs.delete", _convert({"path": _path(p)}, abi.FsPathArgs), Any)
        return {"response_message": f"deleted {_path(p)}"}
    if op == "retrieve":
        args = _convert({"query": _need(p, "query_text", "query"), "k": p.get("k", p.get("n"))},
                        abi.FsSearchArgs)
        hits = await call("fs.search", args, list[abi.FsHit])
        return {"response_message": [msgspec.to_builtins(h) for h in hits]}
    if op == "rollback":
        return {"response_message": await _rollback(p, call)}
    if op == "share":
        args = _convert({"path": _path(p), "to": _need(p, "to"), "rights": p.get("rights")},
                        abi.FsShareArgs)
        return {"response_message": await call("fs.share", args, str)}
    raise Refused(400, f"unknown storage operation_type {op!r}")


async def _rollback(p: dict[str, Any], call: Call) -> str:
    """AIOS's `n` counts versions back from the current one; agentos's names a version."""
    path, version, at = _path(p), p.get("version"), p.get("time")
    if version is None and at is None:
        n = p.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool):
            raise Refused(400, "query_data.params.n must be an integer")
        versions = await call("fs.versions", _convert({"path": path}, abi.FsPathArgs),
                              list[abi.FsVersion])
        current = max((v.version for v in versions), default=0)
        if n < 1 or current - n < 1 or not any(v.version == current - n for v in versions):
            raise Refused(404, f"{path} has no version {n} back from version {current}")
        version = current - n
    args = _convert({"path": path, "version": version, "time": at}, abi.FsRollbackArgs)
    st = await call("fs.rollback", args, abi.FsStat)
    return f"rolled {st.path} back; now version {st.version}"


# --- tools ----------------------------------------------------------------------------------

async def tool(data: Any, call: Call) -> dict[str, Any]:
    calls = data.get("tool_calls") if isinstance(data, dict) else None
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
        raise Refused(400, "query_data.tool_calls must be a non-empty list of {name, parameters}")
    results = []
    for c in calls:
        params = c.get("parameters") or {}
        if isinstance(params, str):  # models often give arguments as a JSON string
            try:
                params = json.loads(params)
            except ValueError:
                raise Refused(400, f"tool {c.get('name')!r}: parameters are not JSON") from None
        args = _convert({"name": c.get("name"), "arguments": params}, abi.ToolCallArgs)
        results.append(await call("tools.call", args, abi.ToolResult))
    values = [r.value if r.error is None else f"error: {r.error}" for r in results]
    return {"response_message": values[0] if len(values) == 1 else values,
            "tool_results": [msgspec.to_builtins(r) for r in results]}


OPERATIONS = {"memory": memory, "storage": storage, "tool": tool}


def response(query_type: str, fields: dict[str, Any], started: float) -> dict[str, Any]:
    ended = time.time()
    return {"response": {"response_class": query_type, **fields, "finished": True,
                         "success": True, "error": None, "status_code": 200},
            "start_times": [started], "end_times": [ended], "waiting_times": [0.0],
            "turnaround_times": [ended - started]}
