"""An AIOS Cerebrum agent (`aios-agent-sdk`): its LLM query sent to AIOS_KERNEL_URL, as
Cerebrum's client sends it."""

import json
import os
import socket
import sys

from cerebrum.client import Cerebrum
from cerebrum.llm.communication import LLMQuery

plan = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
steps: dict = {}


class Query(LLMQuery):  # the PyPI release's query plus `llms`, as AIOS's current SDK has
    llms: list[dict] | None = None


def step(name, fn):
    try:
        steps[name] = fn()
    except Exception as exc:
        response = getattr(exc, "response", None)
        steps[name] = {"error": type(exc).__name__,
                       "status": getattr(response, "status_code", None),
                       "message": (response.text if response is not None else str(exc))[:300]}


def unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        return "connected"


def chat(url=None):
    client = Cerebrum(base_url=url or os.environ["AIOS_KERNEL_URL"])
    result = client._query_llm(agent_name="cerebrum-agent", query=Query(
        messages=[{"role": "user", "content": "write a haiku"}], action_type="chat",
        llms=[{"name": os.environ.get("OPENAI_MODEL", "tiny"), "max_tokens": 4}]))
    response = result["response"]
    return {"content": response["response_message"], "finished": response["finished"],
            "tokens": response["usage"]["completion_tokens"]}


step("chat", chat)
for name in ("host", "outside"):
    if name in plan:
        step(name, lambda url=plan[name]: chat(url))
if "neighbour" in plan:
    step("neighbour", lambda: unix(plan["neighbour"]))
print(json.dumps(steps), flush=True)
