"""AIOS's `POST /query` (the Cerebrum SDK's one endpoint) onto agentos syscalls.

Request `{query_type, agent_name, query_data}`, response `{response, start_times, end_times,
waiting_times, turnaround_times}` as AIOS's kernel sends them (`runtime/launch.py`,
`aios/syscall/syscall.py`). The agent is the token's principal: `agent_name` in the body is
what AIOS trusted and agentos ignores. Unlike AIOS, temperature, max_new_tokens and the JSON
return type are honoured, and structure is enforced as at the OpenAI door (`response_format`
with a JSON Schema, vLLM's `guided_*`, tool calls that always parse).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec

from kernel.doors.http.bridge import Refused
from kernel.doors.http.openai import _message, checked, model_name, structure
from sdk import abi

QUERY_TYPES = ("llm", "memory", "storage", "tool")


def _model(llms: Any, served: Iterable[str]) -> tuple[str | None, dict[str, Any]]:
    """AIOS routes to the first listed model it can serve (by name or alias); so do we. None
    listed: the default; none of those listed served: the first, which the kernel refuses
    (404, naming what is served) rather than answering from a model nobody asked for."""
    served = set(served)
    named = [llm for llm in llms or [] if isinstance(llm, dict) and llm.get("name")]
    for llm in named:
        if llm["name"] in served:
            return llm["name"], llm
    if named:
        return str(named[0]["name"]), named[0]
    first = llms[0] if llms and isinstance(llms[0], dict) else {}
    return None, first


def llm_args(data: Any, served: Iterable[str]) -> abi.ChatArgs:
    if not isinstance(data, dict):
        raise Refused(400, "query_data must be an object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "query_data.messages must be a non-empty list")
    action = data.get("action_type", "chat")
    if action in ("operate_file", "call_tool"):
        raise Refused(501, f"action_type {action!r} (the kernel letting an LLM drive files "
                      "or tools) is not supported; send the operations themselves as "
                      "query_type 'storage' or 'tool'")
    if action not in ("chat", "tool_use", "chat_with_json_output",
                      "chat_with_tool_call_output"):
        raise Refused(400, f"unknown action_type {action!r}")
    model, llm = _model(data.get("llms"), served)
    args: dict[str, Any] = {
        "messages": [_message(m, i) for i, m in enumerate(messages)],
        "model": model_name(model),
        "temperature": llm.get("temperature", data.get("temperature", 1.0)),
        "max_tokens": llm.get("max_tokens", data.get("max_new_tokens", 1000)),
    }
    if llm.get("top_p") is not None:
        args["top_p"] = llm["top_p"]
    if data.get("message_return_type") == "json" or action == "chat_with_json_output":
        args["response_format"] = "json"
    # As at the OpenAI door: `response_format` (a JSON Schema is enforced), vLLM's guided_*,
    # and for tool use `tool_choice` (default "required": a tool call always comes back).
    structured = {key: data[key] for key in ("response_format", "guided_json", "guided_regex",
                                            "guided_choice") if data.get(key) is not None}
    if action in ("tool_use", "chat_with_tool_call_output"):
        if not data.get("tools"):
            raise Refused(400, f"action_type {action!r} needs query_data.tools")
        structured.update(tools=data["tools"], tool_choice=data.get("tool_choice", "required"),
                          parallel_tool_calls=data.get("parallel_tool_calls"))
    args.update(structure(structured))
    try:
        chat = msgspec.convert(args, abi.ChatArgs)
    except msgspec.ValidationError as exc:
        raise Refused(400, f"invalid query_data: {exc}") from None
    checked(chat)
    return chat


def llm_response(result: abi.ChatResult, started: float) -> dict[str, Any]:
    tool_calls = None
    if result.message.tool_calls:
        tool_calls = [{"name": c.function.name, "parameters": _json(c.function.arguments),
                       "id": c.id} for c in result.message.tool_calls]
    ended = time.time()
    return {
        "response": {"response_class": "llm", "response_message": result.message.content,
                     "tool_calls": tool_calls, "finished": True, "error": None,
                     "status_code": 200, "model": result.model,
                     "usage": msgspec.to_builtins(result.usage)},
        "start_times": [started + result.queued_ms / 1000],
        "end_times": [ended],
        "waiting_times": [result.queued_ms / 1000],
        "turnaround_times": [ended - started],
    }


def error_response(query_type: str, status: int, message: str) -> dict[str, Any]:
    """AIOS-shaped failure: FastAPI's `detail`, plus the response object with its error."""
    return {"detail": message, "response": {
        "response_class": query_type, "finished": False, "success": False, "error": message,
        "status_code": status}}


def _json(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text
