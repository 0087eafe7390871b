"""A benchmark agent: waits for "go", then holds a K-turn conversation with the default model.

Task: `INDEX TURNS MAX_TOKENS`. Returns one record per turn (latency, TTFT, tokens, text).
"""

from __future__ import annotations

import time

from workload import SYSTEM, user_turn  # beside this file; the runner puts it on sys.path

from sdk import Agent


class BenchAgent(Agent):
    def run(self, task: str) -> list[dict]:
        index, turns, max_tokens = (int(x) for x in task.split())
        self.ipc.recv()  # the start signal: every agent begins together
        messages = [{"role": "system", "content": SYSTEM}]
        records = []
        for turn in range(turns):
            messages.append({"role": "user", "content": user_turn(index, turn)})
            start = time.perf_counter()
            reply = self.llm.chat(messages, max_tokens=max_tokens)
            latency = time.perf_counter() - start
            text = reply.message.content or ""
            messages.append({"role": "assistant", "content": text})
            records.append({"latency": latency, "ttft": reply.ttft_ms / 1000, "text": text,
                            "tokens": reply.usage.completion_tokens, "end": time.time()})
        return records
