"""OpenAI's chat-completions wire format to and from the `llm.chat` ABI.

Requests are validated here, at the edge: anything the kernel cannot honour is a 400 that names
the field, never silently dropped (unlike AIOS's `/query`, which lost temperature and
response_format). Omitted sampling fields take OpenAI's defaults (temperature 1, top_p 1).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

import msgspec

from kernel.doors.http.bridge import Refused
from sdk import abi

_IGNORED = {"user", "store", "metadata", "logprobs", "top_logprobs", "frequency_penalty",
            "presence_penalty", "logit_bias", "service_tier", "stream_options",
            "reasoning_effort", "modalities", "prediction"}
# vLLM's structured-output extensions, honoured as documented extensions of the same names.
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice"}


def bad(message: str, param: str | None = None) -> Refused:
    return Refused(400, message, "invalid_request", param)


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # sdk.abi.Name's


def model_name(value: Any) -> str | None:
    """A requested model's name (None: the default). A name no served model or alias can have
    (`org/model`, too long) is a 404 like any unknown one, not a malformed request."""
    if value in (None, "", "default"):
        return None
    if not isinstance(value, str):
        raise bad("'model' must be a string", "model")
    if not (_MODEL_NAME.fullmatch(value) and len(value) <= abi.MAX_NAME_CHARS):
        raise Refused(404, f"no model {value!r}", "model_not_found", "model")
    return value


def _content(value: Any, where: str) -> str | None:
    """Message content: a string, or a list of text parts (other parts are refused)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}: content part of type {kind!r} is not supported (text only)")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad(f"{where}: content must be a string or a list of text parts")


def _message(raw: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise bad(f"{where} must be an object")
    role = raw.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise bad(f"{where}.role must be system, developer, user, assistant or tool, "
                  f"not {role!r}")
    out: dict[str, Any] = {"role": role, "content": _content(raw.get("content"), where)}
    for key in ("tool_call_id", "name"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    if raw.get("tool_calls"):
        out["tool_calls"] = [{"id": c.get("id", ""), "type": "function",
                              "function": {"name": c.get("function", {}).get("name", ""),
                                           "arguments": c.get("function", {}).get(
                                               "arguments", "{}")}}
                             for c in raw["tool_calls"] if isinstance(c, dict)]
    return out


def chat_args(body: Any) -> abi.ChatArgs:
    """The `llm.chat` arguments for an OpenAI chat-completions request body."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    if body.get("n", 1) != 1:
        raise bad("only n=1 is supported", "n")
    unknown = sorted(set(body) - _IGNORED - set(_GUIDED) - {
        "model", "messages", "temperature", "top_p", "top_k", "max_tokens",
        "max_completion_tokens", "stop", "seed", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "stream", "n", "priority", "ignore_eos",
        "continue_final_message", "add_generation_prompt"})
    if unknown:
        raise bad(f"unsupported fields: {', '.join(unknown)}", unknown[0])
    args: dict[str, Any] = {"messages": [_message(m, i) for i, m in enumerate(messages)]}
    model = model_name(body.get("model"))
    if model is not None:
        args["model"] = model
    args["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]
    for key in ("top_p", "top_k", "seed", "priority", "ignore_eos"):
        if body.get(key) is not None:
            args[key] = body[key]
    # vLLM's extension, how a fleet resumes a reply on another replica: go on with the last
    # (assistant) message; `add_generation_prompt` may only say the same thing.
    if body.get("continue_final_message"):
        if body.get("add_generation_prompt", False) is not False:
            raise bad("continue_final_message needs add_generation_prompt false",
                      "add_generation_prompt")
        if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise bad("continue_final_message needs an assistant message last", "messages")
        args["continue_final"] = True
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        args["stop"] = [stop] if isinstance(stop, str) else stop
    args.update(structure(body))
    args["stream"] = bool(body.get("stream", False)) and not args.get("tools")
    try:
        chat = msgspec.convert(args, abi.ChatArgs)
    except msgspec.ValidationError as exc:
        raise bad(f"invalid request: {exc}") from None
    checked(chat)
    return chat


def structure(body: dict[str, Any]) -> dict[str, Any]:
    """The `llm.chat` fields for what the output must match: `response_format`, `tools`,
    `tool_choice`, `parallel_tool_calls` and vLLM's `guided_*` (shared by both doors)."""
    args: dict[str, Any] = {}
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise bad("response_format.type must be text, json_object or json_schema",
                      "response_format")
        schema = (fmt.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
        if schema is not None:
            if not isinstance(schema, dict):
                raise bad("response_format.json_schema.schema must be an object",
                          "response_format")
            args["json_schema"] = schema  # enforced, whether or not `strict` is set
        else:
            args["response_format"] = "text" if kind == "text" else "json"
    for field, name in _GUIDED.items():
        if body.get(field) is not None:
            args[name] = body[field]
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise bad("'tools' must be a list of objects", "tools")
        choice = body.get("tool_choice", "auto")
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if (t.get("function") or t).get("name") == wanted]
            if not tools:
                raise bad(f"tool_choice names {wanted!r}, which is not in 'tools'",
                          "tool_choice")
            choice = "required"
        args["tools"], args["tool_choice"] = tools, choice
        if body.get("parallel_tool_calls") is not None:
            args["parallel_tool_calls"] = body["parallel_tool_calls"]
    return args


def checked(args: abi.ChatArgs) -> None:
    """Refuse (400, naming the problem) a structure that cannot be enforced, before the call
    is queued: a streamed reply could otherwise only fail after its 200."""
    from kernel.llm.grammar import GrammarError, check

    try:
        check(args)
    except GrammarError as exc:
        raise bad(f"cannot enforce the requested structure: {exc}") from None


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def _usage(usage: abi.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _tool_calls(calls: list[abi.ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def completion(cid: str, result: abi.ChatResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.message.content}
    if result.message.tool_calls:
        message["tool_calls"] = _tool_calls(result.message.tool_calls)
    return {"id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": result.model, "system_fingerprint": "agentos",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish(result.finish_reason)}],
            "usage": _usage(result.usage)}


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None,
          usage: abi.Usage | None = None) -> bytes:
    """One server-sent event of a streamed completion."""
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model, "system_fingerprint": "agentos",
        "choices": [] if usage is not None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = _usage(usage)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def final_chunks(cid: str, result: abi.ChatResult, include_usage: bool,
                 content_sent: bool) -> list[bytes]:
    """The events that end a stream: any content or tool calls not yet sent, the finish
    reason, the usage if asked for, and `[DONE]`."""
    events = []
    if result.message.tool_calls:
        events.append(chunk(cid, result.model, {"tool_calls": [
            {"index": i, **call} for i, call in enumerate(_tool_calls(
                result.message.tool_calls))]}))
    elif not content_sent and result.message.content:
        events.append(chunk(cid, result.model, {"content": result.message.content}))
    events.append(chunk(cid, result.model, {}, _finish(result.finish_reason)))
    if include_usage:
        events.append(chunk(cid, result.model, {}, usage=result.usage))
    events.append(b"data: [DONE]\n\n")
    return events


def models(infos: list[abi.ModelInfo], created: float) -> dict[str, Any]:
    """Served models, then each alias as an entry of its own whose `root` (vLLM's field for
    the model an entry serves from) is the served name: clients that check their configured
    name against this list find it."""
    data = []
    for m in infos:
        data.append({"id": m.name, "object": "model", "created": int(created),
                     "owned_by": "agentos", "backend": m.backend, "default": m.default,
                     "root": m.name})
    for m in infos:
        data += [{"id": alias, "object": "model", "created": int(created), "owned_by": "agentos",
                  "backend": m.backend, "default": False, "root": m.name} for alias in m.aliases]
    return {"object": "list", "data": data}


def embedding_args(body: Any) -> tuple[abi.EmbedArgs, str, int | None]:
    """`/v1/embeddings`: the texts, the encoding ("float" or "base64", which the `openai`
    client asks for by default) and the requested width, if any."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = set(body) - {"input", "model", "encoding_format", "dimensions", "user"}
    if unknown:
        raise bad(f"unsupported field {sorted(unknown)[0]!r}", sorted(unknown)[0])
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("'input' must be a string or a non-empty list of strings (token ids are not "
                  "supported)", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and not isinstance(dimensions, int):
        raise bad("'dimensions' must be an integer", "dimensions")
    try:
        return msgspec.convert({"input": texts}, abi.EmbedArgs), encoding, dimensions
    except msgspec.ValidationError as exc:
        raise bad(f"invalid 'input': {exc}", "input") from None


def embeddings(result: abi.EmbedResult, encoding: str, dimensions: int | None) -> dict[str, Any]:
    import base64

    import numpy as np

    width = len(result.vectors[0]) if result.vectors else 0
    if dimensions is not None and dimensions != width:
        raise bad(f"'dimensions' must be {width} ({result.model}'s width)", "dimensions")
    data = []
    for i, vector in enumerate(result.vectors):
        value: Any = vector
        if encoding == "base64":  # little-endian float32, as OpenAI sends it
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": result.model,
            "usage": {"prompt_tokens": result.words, "total_tokens": result.words}}
