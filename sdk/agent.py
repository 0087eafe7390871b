"""The `Agent` base class: subclass it, implement `run(task)`, and `agentos run` does the rest."""

from __future__ import annotations

import os
from typing import Any

from sdk import layout


class Agent:
    """An agent program. `self.conn` is its kernel connection (blocking, or asyncio when `run`
    is a coroutine function); `self.sys`, `self.proc`, `self.ipc`, `self.llm`, `self.memory` and
    `self.fs` are its syscall families."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sys, self.proc, self.ipc, self.llm = conn.sys, conn.proc, conn.ipc, conn.llm
        self.caps = conn.caps
        self.memory, self.fs = conn.memory, conn.fs
        self.tools = conn.tools
        self.id = int(os.environ.get(layout.ENV_AGENT_ID, "0")) or None
        self.name = os.environ.get(layout.ENV_AGENT_NAME, type(self).__name__)

    def run_tools(self, messages: Any, tools: Any, max_steps: int = 8, *,
                  require_first: bool = False, **chat: Any) -> Any:
        """The tool-calling loop (blocking connections): `llm.chat` with `tools` (kernel tool
        names or OpenAI schemas), run the calls it makes, feed back the results, until the
        model answers or `max_steps` model calls; returns a `sdk.tools.RunResult`."""
        from sdk.tools import run_tools

        return run_tools(self.conn, messages, tools, max_steps=max_steps,
                         require_first=require_first, **chat)

    def run(self, task: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.run(task) is not implemented")
