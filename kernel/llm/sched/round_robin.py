"""Round robin: time slices in tokens or seconds; an expired job yields to the queue's head."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kernel.llm.sched.budget import Budget
from kernel.llm.sched.job import Job
from kernel.llm.sched.ranked import RankedScheduler


class RoundRobin(RankedScheduler):
    """Each admission buys a slice of `slice_tokens` tokens served (default 64) or `slice_s`
    seconds. Once its slice is used up, a job yields its slot to the head of the queue as soon
    as anyone waits, and goes to the back; with nobody waiting it runs on.

    Bound (token slices S, capacity c, every batched job served at least one token a step):
    a job left waiting by step e with k other jobs waiting is in the batch by step
    e + ceil((k+1)/c)*S. Every slot turns over within S steps and admissions follow queue
    order, while newcomers and preempted jobs queue behind it. With n jobs in all, k <= n-c-1,
    so the wait is at most (ceil(n/c)-1) slices. With slice_s, read S steps as slice_s plus the
    longest gap between two schedule() calls.
    """

    def __init__(self, *, slice_tokens: int | None = None, slice_s: float | None = None,
                 budget: Budget | None = None) -> None:
        super().__init__(budget=budget)
        if slice_tokens is not None and slice_s is not None:
            raise ValueError("give slice_tokens or slice_s, not both")
        if slice_s is None and slice_tokens is None:
            slice_tokens = 64
        if slice_tokens is not None and slice_tokens < 1:
            raise ValueError("slice_tokens must be >= 1")
        if slice_s is not None and not slice_s > 0:
            raise ValueError("slice_s must be > 0")
        self.slice_tokens = slice_tokens
        self.slice_s = slice_s

    def _order(self, now: float) -> Iterable[Job]:
        return self._waiting.values()

    def _keep_key(self, job: Job, now: float) -> tuple[Any, ...]:
        return -job.slice_start, -job.slice_used, job.id  # the longest-served yields first

    def _protected(self, job: Job, now: float) -> bool:
        if self.slice_tokens is not None:
            return job.slice_used < self.slice_tokens
        assert self.slice_s is not None
        return now - job.slice_start < self.slice_s

    def _beats(self, waiting: Job, running: Job, now: float) -> bool:
        return True
