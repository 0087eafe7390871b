"""The `llm` syscall family: chat completions from the kernel's scheduled, batched models."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from sdk import abi
from sdk.proc import _ms
from sdk.syscalls import Family


def _messages(messages: Iterable[abi.ChatMessage | Mapping[str, Any]]) -> list[abi.ChatMessage]:
    return [m if isinstance(m, abi.ChatMessage) else msgspec.convert(m, abi.ChatMessage)
            for m in messages]


class Llm(Family):
    def _args(self, messages: Iterable[abi.ChatMessage | Mapping[str, Any]], stream: bool, *,
              model: str | None, temperature: float, top_p: float, top_k: int, max_tokens: int,
              stop: Sequence[str], seed: int | None, json: bool,
              tools: Sequence[Mapping[str, Any]] | None, tool_choice: str,
              priority: int) -> abi.ChatArgs:
        return abi.ChatArgs(
            messages=_messages(messages), model=model, temperature=temperature, top_p=top_p,
            top_k=top_k, max_tokens=max_tokens, stop=list(stop), seed=seed,
            response_format="json" if json else "text",
            tools=[dict(t) for t in tools] if tools else None, tool_choice=tool_choice,
            priority=priority, stream=stream)

    def chat(self, messages: Iterable[abi.ChatMessage | Mapping[str, Any]], *,
             model: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, max_tokens: int = 256, stop: Sequence[str] = (),
             seed: int | None = None, json: bool = False,
             tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str = "auto",
             priority: int = 0, timeout: float | None = None) -> abi.ChatResult:
        """One chat completion. Greedy when temperature is 0 (the default). `json=True` makes
        the reply a JSON value that parses; `tools` (OpenAI function schemas) may make it a
        message with `tool_calls`. Waits in the kernel's queue as long as it takes, unless
        `timeout` (seconds) is given."""
        args = self._args(messages, False, model=model, temperature=temperature, top_p=top_p,
                          top_k=top_k, max_tokens=max_tokens, stop=stop, seed=seed, json=json,
                          tools=tools, tool_choice=tool_choice, priority=priority)
        ms = _ms(timeout)
        return self._call("llm.chat", args, server_wait_ms=ms, wait_forever=ms is None)

    def stream(self, messages: Iterable[abi.ChatMessage | Mapping[str, Any]], *,
               model: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, max_tokens: int = 256, stop: Sequence[str] = (),
               seed: int | None = None, json: bool = False, priority: int = 0,
               timeout: float | None = None) -> Any:
        """Like `chat`, but the reply arrives as it is generated: iterate the returned stream
        for `ChatDelta`s; its `result` is the `ChatResult` afterwards. Leaving the loop early
        cancels the generation."""
        args = self._args(messages, True, model=model, temperature=temperature, top_p=top_p,
                          top_k=top_k, max_tokens=max_tokens, stop=stop, seed=seed, json=json,
                          tools=None, tool_choice="none", priority=priority)
        ms = _ms(timeout)
        return self._stream("llm.chat", args, server_wait_ms=ms, wait_forever=ms is None)

    def cancel(self, request_id: int) -> None:
        """Cancel this connection's in-flight call `request_id` (it ends with ECANCELED)."""
        return self._call("llm.cancel", abi.CancelArgs(request=request_id))

    def models(self) -> list[abi.ModelInfo]:
        return self._call("llm.models")
