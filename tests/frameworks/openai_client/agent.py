"""An unmodified `openai` client program: models, chat, streaming and a forced tool call."""

import json
import os
import socket
import sys

import openai

plan = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
model = os.environ.get("OPENAI_MODEL", "tiny")
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
steps: dict = {}


def step(name, fn):
    try:
        steps[name] = fn()
    except Exception as exc:
        steps[name] = {"error": type(exc).__name__, "status": getattr(exc, "status_code", None),
                       "message": str(exc)[:300]}


def chat(client=None):
    r = (client or openai.OpenAI(max_retries=0, timeout=60)).chat.completions.create(
        model=model, messages=messages, max_tokens=4)
    return {"content": r.choices[0].message.content, "tokens": r.usage.completion_tokens}


def stream():
    parts = [c.choices[0].delta.content or "" for c in openai.OpenAI(max_retries=0).chat
             .completions.create(model=model, messages=messages, max_tokens=4, stream=True)
             if c.choices]
    return {"chunks": len(parts), "text": "".join(parts)}


def tool():
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                  "maxLength": 8}},
                       "required": ["city"], "additionalProperties": False}}}
    r = openai.OpenAI(max_retries=0, timeout=60).chat.completions.create(
        model=model, messages=messages, max_tokens=160, tools=[weather], temperature=0,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    return {"name": call.function.name, "args": json.loads(call.function.arguments)}


def unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        return "connected"


step("models", lambda: sorted(m.id for m in openai.OpenAI(max_retries=0).models.list()))
step("chat", chat)
step("stream", stream)
step("tool", tool)
for name in ("host", "outside"):
    if name in plan:
        step(name, lambda url=plan[name]: chat(openai.OpenAI(base_url=url, max_retries=0,
                                                             timeout=10)))
if "neighbour" in plan:
    step("neighbour", lambda: unix(plan["neighbour"]))
print(json.dumps(steps), flush=True)
