"""Per-family syscall latencies and per-caller and per-model usage, for `sys.stats` and metrics.

The loop thread records every finished call here (`Switchboard.reply` / `Switchboard.fail`); readers get
copies through `sys.stats`, so nothing outside the loop ever reads these counters live.
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left
from typing import Any

from kernel.call import Call
from sdk import abi

MAX_CALLERS = 1024  # principals kept; the least recently active are forgotten beyond this
RATE_WINDOW_S = 10.0  # tokens/s per model is measured over this window


class Accounts:
    def __init__(self) -> None:
        self.latency: dict[str, list[int]] = {}  # family -> bucket counts (+Inf last)
        self.latency_sum: dict[str, float] = {}
        self.denials: collections.Counter[str] = collections.Counter()  # by family
        self.callers: dict[str, dict[str, float]] = {}
        self._families: dict[str, str] = {}  # syscall name -> family
        self.models: dict[str, dict[str, float]] = {}
        self._recent: dict[str, collections.deque[tuple[float, int]]] = {}

    def _caller(self, principal: str) -> dict[str, float]:
        row = self.callers.get(principal)
        if row is None:
            if len(self.callers) >= MAX_CALLERS:  # forget the least recently active
                del self.callers[min(self.callers, key=lambda p: self.callers[p]["last_call"])]
            row = self.callers[principal] = {"syscalls": 0, "errors": 0, "denials": 0,
                                             "prompt_tokens": 0, "completion_tokens": 0}
        row["last_call"] = time.time()
        return row

    def _finish(self, call: Call) -> dict[str, float]:
        family = self._families.get(call.name)
        if family is None:
            family = self._families[call.name] = call.name.partition(".")[0]
        counts = self.latency.get(family)
        if counts is None:
            counts = self.latency[family] = [0] * (len(abi.LATENCY_BUCKETS) + 1)
            self.latency_sum[family] = 0.0
        seconds = time.monotonic() - call.started
        counts[bisect_left(abi.LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum[family] += seconds
        row = self._caller(call.caller.principal)
        row["syscalls"] += 1
        return row

    def done(self, call: Call, result: Any) -> None:
        row = self._finish(call)
        if isinstance(result, abi.ChatResult):
            row["prompt_tokens"] += result.usage.prompt_tokens
            row["completion_tokens"] += result.usage.completion_tokens
            model = self.models.setdefault(result.model, {
                "calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0})
            model["calls"] += 1
            model["prompt_tokens"] += result.usage.prompt_tokens
            model["completion_tokens"] += result.usage.completion_tokens
            model["cached_tokens"] += result.usage.cached_tokens
            recent = self._recent.setdefault(result.model, collections.deque())
            recent.append((time.monotonic(), result.usage.completion_tokens))

    def failed(self, call: Call, code: abi.ErrorCode) -> None:
        row = self._finish(call)
        row["errors"] += 1
        if code == abi.ErrorCode.EPERM:
            row["denials"] += 1
            self.denials[call.name.partition(".")[0]] += 1

    def tokens_per_s(self, model: str) -> float:
        """Completion tokens of the calls that finished in the last RATE_WINDOW_S seconds."""
        recent = self._recent.get(model)
        if not recent:
            return 0.0
        horizon = time.monotonic() - RATE_WINDOW_S
        while recent and recent[0][0] < horizon:
            recent.popleft()
        return sum(n for _, n in recent) / RATE_WINDOW_S

    def own(self, principal: str) -> dict[str, dict[str, float]]:
        """`principal`'s row alone, for the `sys.stats` of a caller that may see only itself."""
        row = self.callers.get(principal)
        return {principal: dict(row)} if row is not None else {}

    def snapshot(self) -> dict[str, Any]:
        """The fields `sys.stats` adds: copies, safe to encode and hand to another thread."""
        return {
            "latency": {family: abi.Latency(buckets=list(counts), sum_s=self.latency_sum[family])
                        for family, counts in self.latency.items()},
            "denials": dict(self.denials),
            "callers": {p: dict(row) for p, row in self.callers.items()},
            "llm_usage": {name: {**row, "tokens_per_s": self.tokens_per_s(name)}
                          for name, row in self.models.items()},
        }
