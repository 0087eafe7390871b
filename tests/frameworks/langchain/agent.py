"""A LangChain agent (`langchain-openai`): a chat, a forced tool call with bind_tools and a
structured answer with with_structured_output."""

import json
import os
import socket
import sys

from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

plan = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
steps: dict = {}


class Add(BaseModel):
    """Add two integers."""

    a: int = Field(ge=0, le=99)  # bounded: a random model would write digits until max_tokens
    b: int = Field(ge=0, le=99)


class City(BaseModel):
    """A city."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)


def llm(**kwargs):
    return ChatOpenAI(model=os.environ.get("OPENAI_MODEL", "tiny"), temperature=0,
                      max_tokens=120, max_retries=0, timeout=60, **kwargs)


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


step("chat", lambda: {"content": llm(max_completion_tokens=4).invoke("Hello!").content})
step("tool", lambda: [{"name": c["name"], "args": Add.model_validate(c["args"]).model_dump()}
                      for c in llm().bind_tools([Add], tool_choice="Add")
                      .invoke("What is 2 plus 3?").tool_calls])
step("structured", lambda: llm().with_structured_output(City, method="json_schema")
     .invoke("Name a city.").model_dump())
for name in ("host", "outside"):
    if name in plan:
        step(name, lambda url=plan[name]: llm(base_url=url, max_completion_tokens=4)
             .invoke("Hello!").content)
if "neighbour" in plan:
    step("neighbour", lambda: unix(plan["neighbour"]))
print(json.dumps(steps), flush=True)
