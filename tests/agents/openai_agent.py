"""An unmodified OpenAI-client program, as third parties write them: it knows nothing of
agentos, only OPENAI_BASE_URL, OPENAI_API_KEY and OPENAI_MODEL. Prints one JSON line: per
step, its outcome or the error's HTTP status. argv[1] (JSON, optional): {"keys": [other API
keys to try], "probe": [host, port] to connect to}."""

import json
import os
import socket
import sys

import openai

steps: dict = {}
plan = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
client = openai.OpenAI(max_retries=0, timeout=60)
model = os.environ.get("OPENAI_MODEL", "tiny")
messages = [{"role": "user", "content": "hello there"}]


def step(name, fn):
    try:
        steps[name] = fn()
    except openai.APIStatusError as exc:
        steps[name] = {"status": exc.status_code, "message": exc.message}
    except Exception as exc:
        steps[name] = {"error": type(exc).__name__, "message": str(exc)}


step("env", lambda: {"base_url": os.environ.get("OPENAI_BASE_URL"),
                     "model": os.environ.get("OPENAI_MODEL")})
step("models", lambda: sorted(m.id for m in client.models.list()))


def chat():
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    return {"content": r.choices[0].message.content, "tokens": r.usage.completion_tokens,
            "model": r.model}


def stream():
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, stream=True) if c.choices]
    return {"chunks": len(parts), "text": "".join(parts)}


def tools():
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                  "maxLength": 8}},
                       "required": ["city"], "additionalProperties": False}}}
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=160,
                                       tools=[tool], tool_choice="required", temperature=0,
                                       parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls or []
    if not calls:
        return {"finish": r.choices[0].finish_reason, "content": r.choices[0].message.content}
    return [{"name": c.function.name, "args": json.loads(c.function.arguments)} for c in calls]


step("chat", chat)
step("stream", stream)
step("tools", tools)
for i, key in enumerate(plan.get("keys", [])):
    other = openai.OpenAI(api_key=key, max_retries=0, timeout=30)
    step(f"key{i}", lambda other=other: sorted(m.id for m in other.models.list()))
if "probe" in plan:
    def probe():
        with socket.create_connection(tuple(plan["probe"]), timeout=3):
            return "connected"
    step("probe", probe)
if plan.get("sockets"):
    def family(domain, kind):
        def make():
            socket.socket(domain, kind).close()
            return "made"
        return make
    step("netlink", family(socket.AF_NETLINK, socket.SOCK_RAW))
    step("packet", family(socket.AF_PACKET, socket.SOCK_RAW))
    step("vsock", family(socket.AF_VSOCK, socket.SOCK_STREAM))
print(json.dumps(steps), flush=True)
