"""The door benchmark's agent (tools/bench/door.py): the same calls through the SDK, through
its in-sandbox OpenAI door with raw HTTP, and with the `openai` client, interleaved call by
call so the three arms see the same load. Task: JSON {"calls": N, "model": NAME}. Result: the
seconds of each call, per call kind and arm."""

from __future__ import annotations

import http.client
import json
import os
import time

import openai

from sdk import Agent

HELLO = [{"role": "user", "content": "hi"}]


class DoorBench(Agent):
    def run(self, task: str) -> dict:
        plan = json.loads(task)
        model, calls = plan["model"], plan["calls"]
        client = openai.OpenAI(max_retries=0, timeout=120)  # OPENAI_BASE_URL, OPENAI_API_KEY
        host, _, port = os.environ["OPENAI_BASE_URL"][len("http://"):].partition("/")[0] \
            .partition(":")
        raw = http.client.HTTPConnection(host, int(port), timeout=120)
        auth = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}",
                "Content-Type": "application/json"}
        body = json.dumps({"model": model, "messages": HELLO, "max_tokens": 1,
                           "temperature": 0})

        def fetch(method: str, path: str, data: str | None = None) -> None:
            try:
                raw.request(method, f"/v1{path}", data, auth)
                resp = raw.getresponse()
            except (BrokenPipeError, http.client.RemoteDisconnected):
                raw.close()  # idle past the server's keep-alive: a new connection
                raw.request(method, f"/v1{path}", data, auth)
                resp = raw.getresponse()
            resp.read()
            assert resp.status == 200, resp.status

        arms = {
            "llm.models": {
                "sdk": self.llm.models,
                "door": lambda: fetch("GET", "/models"),
                "openai": client.models.list},
            "llm.chat, 1 token": {
                "sdk": lambda: self.llm.chat(HELLO, model=model, max_tokens=1, temperature=0),
                "door": lambda: fetch("POST", "/chat/completions", body),
                "openai": lambda: client.chat.completions.create(
                    model=model, messages=HELLO, max_tokens=1, temperature=0)},
        }
        out: dict[str, dict[str, list[float]]] = {}
        for kind, fns in arms.items():
            for fn in fns.values():
                fn()  # warm up: connections, first-use costs
            times: dict[str, list[float]] = {arm: [] for arm in fns}
            for _ in range(calls if kind == "llm.models" else max(calls // 4, 5)):
                for arm, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[arm].append(time.perf_counter() - start)
            out[kind] = times
        return out
