"""A benchmark agent like llm_agent.py, but it talks to the kernel's OpenAI-compatible endpoint
with the official `openai` client, as an unmodified OpenAI program would.

Task: `INDEX TURNS MAX_TOKENS`; the start message carries `{"url": ..., "key": ...}`.
"""

from __future__ import annotations

import time

import openai
from workload import SYSTEM, user_turn  # beside this file; the runner puts it on sys.path

from sdk import Agent


class HttpBenchAgent(Agent):
    def run(self, task: str) -> list[dict]:
        index, turns, max_tokens = (int(x) for x in task.split())
        start = self.ipc.recv().data  # every agent begins together
        client = openai.OpenAI(base_url=start["url"], api_key=start["key"], max_retries=0,
                               timeout=600)
        messages = [{"role": "system", "content": SYSTEM}]
        records = []
        for turn in range(turns):
            messages.append({"role": "user", "content": user_turn(index, turn)})
            began = time.perf_counter()
            reply = client.chat.completions.create(model="smollm2", messages=messages,
                                                   max_tokens=max_tokens, temperature=0)
            latency = time.perf_counter() - began
            text = reply.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": text})
            records.append({"latency": latency, "ttft": None, "text": text,
                            "tokens": reply.usage.completion_tokens, "end": time.time()})
        return records
