"""Chat requests to prompts and model text back to OpenAI-style messages (with tool calls).

Tools are described to the model in a system message with one exact JSON shape to answer in,
`{"tool_calls": [{"name": ..., "arguments": {...}}]}`, because small models' chat templates
rarely support tools natively. The reply is generated under a grammar of exactly that shape
(kernel/llm/grammar.py): with `tool_choice="required"` it is calls whose arguments fit their
tool's schema; with "auto" a reply that starts with `{` is such a call and anything else is
text (still parsed leniently: the first JSON object in it that names a known tool).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sdk import abi

TOOL_PROMPT = """You can call these tools:
{tools}

To call tools, reply with only this JSON and nothing else:
{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}]}}
Otherwise answer normally."""


def tool_prompt(tools: Sequence[dict[str, Any]]) -> str:
    lines = []
    for tool in tools:
        fn = tool.get("function", tool)
        params = json.dumps(fn.get("parameters", {}), separators=(",", ":"))
        lines.append(f"- {fn.get('name')}: {fn.get('description', '')} parameters: {params}")
    return TOOL_PROMPT.format(tools="\n".join(lines))


def template_messages(args: abi.ChatArgs) -> list[dict[str, Any]]:
    """The messages as the tokenizer's chat template wants them, tools folded into text."""
    out: list[dict[str, Any]] = []
    if args.tools and args.tool_choice != "none":
        out.append({"role": "system", "content": tool_prompt(args.tools)})
    for m in args.messages:
        content = m.content or ""
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _loads(c.function.arguments)}
                     for c in m.tool_calls]
            content = json.dumps({"tool_calls": calls})
        if m.role == "tool":
            # Templates without a tool role: present the result as a user turn, labelled.
            out.append({"role": "user", "content": f"Tool result ({m.name or m.tool_call_id}): "
                                                   f"{content}"})
            continue
        out.append({"role": m.role, "content": content})
    if out and out[0]["role"] == "system" and len(out) > 1 and out[1]["role"] == "system":
        out[0:2] = [{"role": "system", "content": out[1]["content"] + "\n\n" + out[0]["content"]}]
    return out


def render(tokenizer: Any, args: abi.ChatArgs) -> list[int]:
    """Token ids of the prompt, ending where the assistant's reply starts (or, to continue
    one, where its last message's text ends)."""
    if args.continue_final and args.messages[-1].role != "assistant":
        raise ValueError("continue_final needs an assistant message last")
    extra = ({"continue_final_message": True} if args.continue_final else
             {"add_generation_prompt": True})
    ids = tokenizer.apply_chat_template(template_messages(args), tokenize=True, **extra)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


@dataclass
class Parsed:
    content: str | None
    tool_calls: list[abi.ToolCall] | None
    error: str | None = None  # why a reply that looked like a tool call was not one


def _json_objects(text: str) -> list[Any]:
    """Every JSON object that starts at a '{' in `text` and parses, in order."""
    decoder = json.JSONDecoder()
    found, i = [], text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        found.append(value)
        i = text.find("{", end)
    return found


def _calls_in(value: Any) -> list[dict[str, Any]] | None:
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        return value["tool_calls"]
    if isinstance(value, dict) and "name" in value:
        return [value]  # a bare call, a common small-model shortcut
    return None


def parse_reply(text: str, tools: Sequence[dict[str, Any]] | None) -> Parsed:
    """Split model text into content or OpenAI-style tool calls, never raising."""
    if not tools:
        return Parsed(text, None)
    names = {t.get("function", t).get("name") for t in tools}
    problems = []
    for value in _json_objects(text):
        raw_calls = _calls_in(value)
        if raw_calls is None:
            continue
        calls = []
        for raw in raw_calls:
            if not isinstance(raw, dict) or raw.get("name") not in names:
                name = raw.get("name") if isinstance(raw, dict) else raw
                problems.append(f"unknown tool {name!r}")
                continue
            arguments = raw.get("arguments", raw.get("parameters", {}))
            if isinstance(arguments, str):
                arguments = _loads(arguments)
            if not isinstance(arguments, dict):
                problems.append(f"arguments of {raw['name']} are not an object")
                continue
            calls.append(abi.ToolCall(id=f"call_{secrets.token_hex(6)}", function=abi.FunctionCall(
                name=raw["name"], arguments=json.dumps(arguments))))
        if calls:
            return Parsed(None, calls)
    return Parsed(text, None, "; ".join(problems) or None)
