"""First in, first out: by arrival, and a running job runs to the end."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kernel.llm.sched.budget import Budget
from kernel.llm.sched.job import Job
from kernel.llm.sched.ranked import RankedScheduler
from kernel.llm.sched.runqueue import RunQueue


class FIFO(RankedScheduler):
    """Free slots go to the earliest arrivals; running jobs are never displaced.

    Only a capacity (or budget cap) smaller than the running set preempts, latest arrival first.
    """

    def __init__(self, *, budget: Budget | None = None) -> None:
        super().__init__(budget=budget)
        self._queue_by_arrival = RunQueue(key=lambda job: (job.arrival,))

    def _enqueue(self, job: Job) -> None:
        self._queue_by_arrival.add(job)

    def _dequeue(self, job: Job) -> None:
        self._queue_by_arrival.remove(job)

    def _order(self, now: float) -> Iterable[Job]:
        return self._queue_by_arrival

    def _keep_key(self, job: Job, now: float) -> tuple[Any, ...]:
        return job.arrival, job.id

    def _protected(self, job: Job, now: float) -> bool:
        return True

    def _beats(self, waiting: Job, running: Job, now: float) -> bool:
        return False
