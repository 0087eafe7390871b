"""`python -m sdk.runner PATH [ARGS...]`: how the kernel starts an agent program.

PATH runs once as `__main__`. If it defines one `Agent` subclass, the runner then connects,
calls `run(task)` with the arguments joined by spaces, reports the result with `proc.exit`,
prints it, and exits 0 (1 on an exception). A file with no Agent subclass is a plain script
and is done once it has run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

import sdk
from sdk.agent import Agent


def _agent_classes(namespace: dict[str, Any]) -> list[type[Agent]]:
    return [obj for obj in namespace.values()
            if inspect.isclass(obj) and issubclass(obj, Agent) and obj is not Agent
            and obj.__module__ == "__main__"]


def _show(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, default=repr)
    except (TypeError, ValueError):
        return repr(result)


async def _run_async(cls: type[Agent], task: str) -> Any:
    async with sdk.connect_async() as conn:
        result = await cls(conn).run(task)
        await conn.proc.exit(result)
        return result


def _run(cls: type[Agent], task: str) -> int:
    try:
        if inspect.iscoroutinefunction(cls.run):
            result = asyncio.run(_run_async(cls, task))
        else:
            with sdk.connect() as conn:
                result = cls(conn).run(task)
                conn.proc.exit(result)
    except Exception:
        traceback.print_exc()
        return 1
    if result is not None:
        print(_show(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m sdk.runner PATH [ARGS...]", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"runner: no such file: {path}", file=sys.stderr)
        return 2
    sys.argv = [str(path), *argv[1:]]
    sys.path.insert(0, str(path.parent))
    # One execution, as `__main__`: a plain script runs its main block here and is done.
    namespace = runpy.run_path(str(path), run_name="__main__")
    classes = _agent_classes(namespace)
    if not classes:
        return 0
    if len(classes) > 1:
        names = ", ".join(c.__name__ for c in classes)
        print(f"runner: {path} defines several Agent classes ({names}); keep one", file=sys.stderr)
        return 2
    return _run(classes[0], " ".join(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
