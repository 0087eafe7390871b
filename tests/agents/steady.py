"""A well-behaved agent: pings the kernel a few hundred times and reports the slowest call."""

import time

from sdk import Agent


class Steady(Agent):
    def run(self, task: str) -> dict:
        worst = 0.0
        for _ in range(int(task or 200)):
            start = time.perf_counter()
            self.sys.null()
            worst = max(worst, time.perf_counter() - start)
        return {"ok": True, "worst_ms": round(worst * 1000, 2)}
