"""The `tools` syscall family, and the tool-calling loop: model → tool calls → results → model."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdk import abi
from sdk.client import _final
from sdk.errors import SyscallError
from sdk.proc import _ms
from sdk.syscalls import SIGNATURES, Family

RESULT_CHARS = 4000  # how much of a tool's result goes back into the conversation
# A reply that names tool calls but did not parse as one: the model tried and got it wrong.
_ATTEMPT = re.compile(r'"tool_calls"|"name"\s*:|"arguments"\s*:')


class Tools(Family):
    def list(self) -> list[abi.ToolSpec]:
        return self._call("tools.list")

    def call(self, name: str, arguments: Mapping[str, Any] | None = None, *,
             timeout: float | None = None, **kwargs: Any) -> abi.ToolResult:
        """Run tool `name` with `arguments` (or keyword arguments). A tool's own failure is a
        result with `error` set; the kernel's refusals raise (InvalidArgument for arguments
        that do not fit the schema, PermissionDenied, TimedOut, ...)."""
        if kwargs or arguments is None:
            arguments = {**(arguments or {}), **kwargs}
        args = abi.ToolCallArgs(name=name, arguments=arguments)
        ms = _ms(timeout)
        return self._call("tools.call", args, server_wait_ms=ms, wait_forever=ms is None)

    def call_many(self, calls: Iterable[tuple[str, Any]], *, timeout: float | None = None
                  ) -> Any:
        """Run several calls at once (the kernel runs them concurrently where the tools' limits
        and locks allow) and return, in order, each one's ToolResult or SyscallError."""
        requests = [abi.ToolCallArgs(name=name, arguments=arguments) for name, arguments in calls]
        ms = _ms(timeout)
        if inspect.iscoroutinefunction(self._conn.call):
            return self._gather(requests, ms)
        conn = self._conn
        rids = [conn._send("tools.call", r, ms) for r in requests]
        out: list[abi.ToolResult | SyscallError] = []
        for rid in rids:
            try:
                while isinstance(msg := conn._next(rid, "tools.call", None if ms is None
                                                   else ms / 1000 + conn.timeout), abi.Chunk):
                    pass
                out.append(_final(msg, SIGNATURES["tools.call"].result))
            except SyscallError as exc:
                out.append(exc)
            finally:
                conn._done(rid)
        return out

    async def _gather(self, requests: list[abi.ToolCallArgs], ms: int | None
                      ) -> list[abi.ToolResult | SyscallError]:
        import asyncio

        results = await asyncio.gather(
            *(self._call("tools.call", r, server_wait_ms=ms, wait_forever=ms is None)
              for r in requests),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, SyscallError):
                raise r
        return list(results)

    def mount(self, name: str, command: Sequence[str], *, network: bool = False,
              timeout: float = 60.0) -> list[str]:
        """Mount the MCP server that `command` starts (stdio) as `name`; its tools' names."""
        args = abi.MountArgs(name=name, command=list(command), network=network)
        return self._call("tools.mount", args, server_wait_ms=_ms(timeout))

    def unmount(self, name: str) -> None:
        return self._call("tools.unmount", abi.ToolRef(name=name))

    def mounts(self) -> list[abi.MountInfo]:
        return self._call("tools.mounts")


# --- the tool-calling loop ----------------------------------------------------------------------

@dataclass
class RunResult:
    answer: str | None  # the model's final text; None if the step limit came first
    messages: list[dict[str, Any]]  # the whole conversation, tool calls and results included
    steps: int  # model calls made
    tool_calls: int = 0
    errors: list[str] = field(default_factory=list)  # what was fed back as a failed call


def _schemas(conn: Any, tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI function schemas for `tools`: kernel tool names, ToolSpecs, or schemas as is."""
    specs: dict[str, abi.ToolSpec] | None = None
    out = []
    for tool in tools:
        if isinstance(tool, str):
            if specs is None:
                specs = {s.name: s for s in conn.tools.list()}
            if tool not in specs:
                raise ValueError(f"no tool {tool!r} in the kernel")
            tool = specs[tool]
        if isinstance(tool, abi.ToolSpec):
            tool = {"type": "function", "function": {"name": tool.name,
                                                     "description": tool.description,
                                                     "parameters": tool.parameters}}
        out.append(dict(tool))
    return out


def _message(m: abi.ChatMessage | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(m, abi.ChatMessage):
        import msgspec

        return msgspec.to_builtins(m)
    return dict(m)


def _content(result: abi.ToolResult | SyscallError) -> tuple[str, str | None]:
    """What the model reads back for one call, and the error if it failed."""
    if isinstance(result, SyscallError):
        error = f"error ({result.code.name}): {result.message}"
        return error, error
    if result.error is not None:
        error = f"error: {result.error}"
        return error, error
    text = json.dumps(result.value, default=str)
    if result.stdout:
        text += f"\nprinted: {result.stdout}"
    return text[:RESULT_CHARS], None


def run_tools(conn: Any, messages: Iterable[abi.ChatMessage | Mapping[str, Any]],
              tools: Sequence[Any], *, max_steps: int = 8, require_first: bool = False,
              **chat: Any) -> RunResult:
    """Ask the model; run the tool calls it makes through the kernel; give it the results;
    repeat until it answers in text or `max_steps` model calls were made. A malformed call
    (unknown tool, arguments that are not JSON or do not fit the schema, a refused call) is
    answered with an error message the model can correct, never raised. `require_first`
    makes the first reply a tool call (`tool_choice="required"`: enforced by a grammar, its
    arguments fit the tool's schema), which small models that rarely call tools on their own
    need."""
    history = [_message(m) for m in messages]
    schemas = _schemas(conn, tools)
    names = {s["function"]["name"] for s in schemas}
    result = RunResult(None, history, 0)
    while result.steps < max_steps:
        choice = {"tool_choice": "required"} if require_first and result.steps == 0 else {}
        reply = conn.llm.chat(history, tools=schemas, **{**chat, **choice})
        result.steps += 1
        message = reply.message
        calls = message.tool_calls or []
        if not calls:
            text = message.content or ""
            history.append({"role": "assistant", "content": text})
            if _ATTEMPT.search(text) and result.steps < max_steps:
                # It tried to call a tool and the call did not parse: say so, let it retry.
                error = ('error: that tool call could not be parsed. Reply with only '
                         '{"tool_calls": [{"name": "<tool>", "arguments": {...}}]}, where '
                         f'<tool> is one of {", ".join(sorted(names))}, or answer in text.')
                result.errors.append(error)
                history.append({"role": "user", "content": error})
                continue
            result.answer = text
            return result
        history.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                          "arguments": c.function.arguments}}
            for c in calls]})
        runnable: list[tuple[int, str, Any]] = []
        answers: list[str | None] = [None] * len(calls)
        for i, c in enumerate(calls):
            if c.function.name not in names:
                answers[i] = (f"error: no tool {c.function.name!r}; the tools are "
                              f"{', '.join(sorted(names))}")
                continue
            try:
                arguments = json.loads(c.function.arguments or "{}")
            except ValueError as exc:
                answers[i] = f"error: arguments are not valid JSON ({exc})"
                continue
            runnable.append((i, c.function.name, arguments))
        outcomes = conn.tools.call_many([(name, args) for _, name, args in runnable])
        result.tool_calls += len(runnable)
        for (i, _, _), outcome in zip(runnable, outcomes, strict=True):
            answers[i], error = _content(outcome)
            if error:
                result.errors.append(error)
        for c, text in zip(calls, answers, strict=True):
            if text is not None and text.startswith("error: ") and text not in result.errors:
                result.errors.append(text)
            history.append({"role": "tool", "tool_call_id": c.id, "name": c.function.name,
                            "content": text})
    return result
