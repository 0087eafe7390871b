"""The `llm` syscall family: chat completions from the kernel's scheduled, batched models."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from sdk import abi, layout
from sdk.proc import _ms
from sdk.syscalls import Family


def _messages(messages: Iterable[abi.ChatMessage | Mapping[str, Any]]) -> list[abi.ChatMessage]:
    return [m if isinstance(m, abi.ChatMessage) else msgspec.convert(m, abi.ChatMessage)
            for m in messages]


def _schema(schema: Mapping[str, Any] | Any | None) -> dict[str, Any] | None:
    """A JSON Schema as a dict; a pydantic model class (anything with `model_json_schema`) is
    asked for its own."""
    if schema is None or isinstance(schema, Mapping):
        return dict(schema) if schema is not None else None
    return schema.model_json_schema()


def _tool_choice(tools: Sequence[Mapping[str, Any]] | None, choice: str | Mapping[str, Any]
                 ) -> tuple[list[dict[str, Any]] | None, str]:
    """(tools, "auto"|"none"|"required"): a named function (OpenAI's `{"type": "function",
    "function": {"name": ...}}`, or just the name) keeps that tool alone, required."""
    listed = [dict(t) for t in tools] if tools else None
    if isinstance(choice, Mapping):
        choice = (choice.get("function") or {}).get("name") or ""
    if choice in ("auto", "none", "required") or not listed:
        return listed, choice
    named = [t for t in listed if t.get("function", t).get("name") == choice]
    if not named:
        raise ValueError(f"tool_choice names {choice!r}, which is not in tools")
    return named, "required"


class Llm(Family):
    def _args(self, messages: Iterable[abi.ChatMessage | Mapping[str, Any]], stream: bool, *,
              model: str | None, temperature: float, top_p: float, top_k: int, max_tokens: int,
              stop: Sequence[str], seed: int | None, json: bool,
              tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | Mapping[str, Any],
              priority: int, json_schema: Any = None, regex: str | None = None,
              choice: Sequence[str] | None = None, parallel_tool_calls: bool = True
              ) -> abi.ChatArgs:
        listed, tool_choice = _tool_choice(tools, tool_choice)
        if model is None:  # `agentos run --model NAME` sets it; unset: the kernel's default
            model = os.environ.get(layout.ENV_MODEL) or None
        return abi.ChatArgs(
            messages=_messages(messages), model=model, temperature=temperature, top_p=top_p,
            top_k=top_k, max_tokens=max_tokens, stop=list(stop), seed=seed,
            response_format="json" if json else "text", tools=listed, tool_choice=tool_choice,
            priority=priority, stream=stream, json_schema=_schema(json_schema), regex=regex,
            choice=list(choice) if choice is not None else None,
            parallel_tool_calls=parallel_tool_calls)

    def chat(self, messages: Iterable[abi.ChatMessage | Mapping[str, Any]], *,
             model: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, max_tokens: int = 256, stop: Sequence[str] = (),
             seed: int | None = None, json: bool = False, json_schema: Any = None,
             regex: str | None = None, choice: Sequence[str] | None = None,
             tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str | Mapping[str, Any] = "auto", parallel_tool_calls: bool = True,
             priority: int = 0, timeout: float | None = None) -> abi.ChatResult:
        """One chat completion. Greedy when temperature is 0 (the default).

        The output can be made to match a structure, enforced token by token (at most one):
        `json=True` any JSON object, `json_schema` a JSON Schema (a dict, or a pydantic model
        class), `regex` a regular expression, `choice` one of the given strings. `tools`
        (OpenAI function schemas) may make the reply a message with `tool_calls`:
        `tool_choice="required"` or a tool's name (or OpenAI's `{"type": "function", ...}`)
        always yields calls whose arguments fit the tool's `parameters`; "auto" lets the model
        answer in text or call; `parallel_tool_calls=False` allows one call. A reply cut short
        by `max_tokens` has finish_reason "length" (its structure is unfinished). Waits in the
        kernel's queue as long as it takes, unless `timeout` (seconds) is given."""
        args = self._args(messages, False, model=model, temperature=temperature, top_p=top_p,
                          top_k=top_k, max_tokens=max_tokens, stop=stop, seed=seed, json=json,
                          tools=tools, tool_choice=tool_choice, priority=priority,
                          json_schema=json_schema, regex=regex, choice=choice,
                          parallel_tool_calls=parallel_tool_calls)
        ms = _ms(timeout)
        return self._call("llm.chat", args, server_wait_ms=ms, wait_forever=ms is None)

    def stream(self, messages: Iterable[abi.ChatMessage | Mapping[str, Any]], *,
               model: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, max_tokens: int = 256, stop: Sequence[str] = (),
               seed: int | None = None, json: bool = False, json_schema: Any = None,
               regex: str | None = None, choice: Sequence[str] | None = None,
               priority: int = 0, timeout: float | None = None) -> Any:
        """Like `chat` (without tools), but the reply arrives as it is generated: iterate the
        returned stream for `ChatDelta`s; its `result` is the `ChatResult` afterwards. Leaving
        the loop early cancels the generation."""
        args = self._args(messages, True, model=model, temperature=temperature, top_p=top_p,
                          top_k=top_k, max_tokens=max_tokens, stop=stop, seed=seed, json=json,
                          tools=None, tool_choice="none", priority=priority,
                          json_schema=json_schema, regex=regex, choice=choice)
        ms = _ms(timeout)
        return self._stream("llm.chat", args, server_wait_ms=ms, wait_forever=ms is None)

    def cancel(self, request_id: int) -> None:
        """Cancel this connection's in-flight call `request_id` (it ends with ECANCELED)."""
        return self._call("llm.cancel", abi.CancelArgs(request=request_id))

    def models(self) -> list[abi.ModelInfo]:
        return self._call("llm.models")
