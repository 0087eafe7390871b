"""Records an agent's model calls for tools/bench/agents.py: the same code in a sandboxed agent
(react_agent.py) and in the harness's in-process systems, so calls match by their prompts.

Standard library only: a strict-tier agent imports it from its own directory.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any


def digest(messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """What identifies a call: its messages and the options that change the text (the model
    is the default in every system, so it is left out)."""
    wanted = {k: v for k, v in options.items() if k in ("max_tokens", "stop", "temperature")}
    text = json.dumps({"messages": messages, **wanted}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Recorded:
    """Stands in for an agent's `llm` family: `chat` passes the call on and records it."""

    def __init__(self, chat: Callable[..., Any]) -> None:
        self._chat = chat
        self.calls: list[dict[str, Any]] = []

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> Any:
        key = digest(messages, options)
        start = time.perf_counter()
        reply = self._chat(messages, **options)
        self.calls.append({"prompt": key, "text": reply.message.content or "",
                           "tokens": reply.usage.completion_tokens,
                           "latency": time.perf_counter() - start,
                           "queued": reply.queued_ms / 1000, "ttft": reply.ttft_ms / 1000,
                           "preemptions": reply.preemptions})
        return reply


def run_recorded(agent: Any, opts: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """A reference agent's run for the benchmarks: wait for the "go" that starts every agent
    together, solve the task with each model call recorded, and report the calls, `keys` of
    the agent's own outcome and when it ended. The agent calls `self.llm.chat(...)` only."""
    agent.ipc.recv()
    recorder = Recorded(agent.llm.chat)
    agent.llm = recorder
    out = agent.solve(" ".join(opts.task), opts)
    return {"calls": recorder.calls, **{k: out[k] for k in keys}, "end": time.time()}
