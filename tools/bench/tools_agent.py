"""A tool benchmark agent: waits for "go", then makes N calculator calls one after another.

Task: `N`. Returns each call's round trip and the tool's own time, and when it started/ended.
"""

from __future__ import annotations

import time

from sdk import Agent


class ToolBenchAgent(Agent):
    def run(self, task: str) -> dict:
        n = int(task)
        for _ in range(3):  # warm: this agent's first calls may meet a process start
            self.tools.call("calculator", expression="1+1")
        self.ipc.recv()  # every agent starts together
        rtt, tool = [], []
        start = time.time()
        for i in range(n):
            t0 = time.perf_counter()
            result = self.tools.call("calculator", expression=f"{i} * 3 + 1")
            rtt.append((time.perf_counter() - t0) * 1000)
            tool.append(result.tool_ms)
        return {"rtt_ms": rtt, "tool_ms": tool, "start": start, "end": time.time()}
