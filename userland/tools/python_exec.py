"""Python sandbox: run a snippet in a fresh child of the (already sandboxed) tool process.

The tool process has no network (its seccomp filter refuses every socket but AF_UNIX) and sees
only its runtime and scratch directory (Landlock). Each snippet runs in a forked child with its
own CPU-time and address-space limits, a wall-clock deadline and a cap on what it prints.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import sys
import time
import traceback
from typing import Any

MANIFEST = {
    "name": "python",
    "description": "Run a Python snippet (no network, limited CPU and memory) and return what "
                   "it prints.",
    "parameters": {"type": "object", "properties": {
        "code": {"type": "string", "minLength": 1, "maxLength": 100000},
        "cpu_seconds": {"type": "integer", "minimum": 1, "maximum": 30, "default": 5},
        "memory_mb": {"type": "integer", "minimum": 32, "maximum": 1024, "default": 256}},
        "required": ["code"], "additionalProperties": False},
    "side_effect": "read-only",
    "concurrency": 4,
    "timeout_s": 35.0,
}

OUTPUT_CAP = 64 * 1024


def _child(code: str, cpu: int, memory_mb: int, out: int) -> None:
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, 1 << 16)  # the kernel's protocol fd above all: the snippet never sees it
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = sys.stdout
    status = 0
    try:
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc(limit=-3)
        status = 1
    sys.stdout.flush()
    os._exit(status)


def run(args: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    cpu, memory = args.get("cpu_seconds", 5), args.get("memory_mb", 256)
    # Wall clock: generous over the CPU limit (a busy machine runs the snippet slower), but
    # within the call's own deadline so the result still gets back.
    deadline = time.monotonic() + min(cpu * 10 + 5, ctx.get("deadline_s", 35) - 0.5)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(args["code"], cpu, memory, w)
        finally:
            os._exit(70)
    os.close(w)
    chunks, size, why = [], 0, None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "wall-clock deadline passed"
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk[:OUTPUT_CAP - size])
            size += len(chunk)
            if size > OUTPUT_CAP:
                why = f"printed more than {OUTPUT_CAP} bytes"
                break
    finally:
        os.close(r)
        if why:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    output = b"".join(chunks).decode(errors="replace")
    result: dict[str, Any] = {"output": output}
    if why:
        result["killed"] = why
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        result["killed"] = ("CPU time limit" if sig in (signal.SIGXCPU, signal.SIGKILL)
                            else signal.Signals(sig).name)
    else:
        result["exit"] = os.WEXITSTATUS(status)
    return result
