"""An OpenAI Agents SDK agent on its chat-completions model (OpenAIChatCompletionsModel): a
plain answer, a streamed one, and a run that calls its function tool."""

import asyncio
import json
import os
import socket
import sys

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

plan = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
set_tracing_disabled(True)  # traces go to OpenAI's own servers, which this agent does not use
steps: dict = {}


@function_tool
def get_weather(celsius: bool) -> str:
    """The weather in Paris.

    Args:
        celsius: in degrees Celsius rather than Fahrenheit
    """
    return "sunny, 21" if celsius else "sunny, 70"


def agent(base_url=None, **settings):
    client = AsyncOpenAI(base_url=base_url, max_retries=0, timeout=60)
    model = OpenAIChatCompletionsModel(model=os.environ.get("OPENAI_MODEL", "tiny"),
                                       openai_client=client)
    return Agent(name="weather", instructions="Answer briefly.", model=model,
                 model_settings=ModelSettings(max_tokens=4, **settings))


def step(name, fn):
    try:
        steps[name] = fn()
    except Exception as exc:
        steps[name] = {"error": type(exc).__name__, "status": getattr(exc, "status_code", None),
                       "message": str(exc)[:300]}


def unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        return "connected"


def chat(base_url=None):
    result = Runner.run_sync(agent(base_url), "Hello!")
    return {"content": result.final_output,
            "tokens": sum(r.usage.output_tokens for r in result.raw_responses)}


def stream():
    async def go():
        result = Runner.run_streamed(agent(), "Hello!")
        return sum([1 async for e in result.stream_events() if e.type == "raw_response_event"])
    return {"events": asyncio.run(go())}


def tool():
    weather = agent(tool_choice="get_weather", parallel_tool_calls=False, temperature=0)
    weather.model_settings.max_tokens = 160
    weather.tools = [get_weather]
    weather.tool_use_behavior = "stop_on_first_tool"  # the tool's answer is the run's
    return {"output": Runner.run_sync(weather, "Weather in Paris?").final_output}


step("chat", chat)
step("stream", stream)
step("tool", tool)
for name in ("host", "outside"):
    if name in plan:
        step(name, lambda url=plan[name]: chat(url))
if "neighbour" in plan:
    step("neighbour", lambda: unix(plan["neighbour"]))
print(json.dumps(steps), flush=True)
