"""Search the calling agent's own files (and, where a memory manager exports them, memories)."""

from __future__ import annotations

import os
from typing import Any

from userland.tools.runtime import ToolError

MANIFEST = {
    "name": "search",
    "description": "Find lines containing a text in your own files and memories.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 256},
        "limit": {"type": "integer", "minimum": 1, "maximum": 200, "default": 20}},
        "required": ["query"], "additionalProperties": False},
    "side_effect": "read-only",
    "reads_caller_files": True,
    "concurrency": 4,
    "timeout_s": 10.0,
}

MAX_FILE_BYTES = 1 << 20
MAX_FILES = 2000


def _files(root: str) -> Any:
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            seen += 1
            if seen > MAX_FILES:
                return
            yield os.path.join(dirpath, name)


def run(args: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    # The kernel names the sources: the caller's home, plus memory directories when a memory
    # manager exports them. Nothing the caller says widens this.
    sources = ctx.get("sources") or []
    if not sources:
        raise ToolError("no files or memories to search (the caller has no home)")
    query, limit = args["query"].lower(), args.get("limit", 20)
    hits: list[dict[str, Any]] = []
    for source in sources:
        root = source["path"]
        for path in _files(root):
            try:
                if os.path.islink(path) or os.path.getsize(path) > MAX_FILE_BYTES:
                    continue
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", errors="replace")
            except OSError:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if query in line.lower():
                    hits.append({"source": source["kind"], "path": os.path.relpath(path, root),
                                 "line": number, "text": line.strip()[:300]})
                    if len(hits) >= limit:
                        return {"hits": hits, "truncated": True}
    return {"hits": hits, "truncated": False}
