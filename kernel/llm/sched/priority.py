"""Priority with aging: the most urgent first, and waiting raises urgency so nothing starves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kernel.llm.sched.budget import Budget
from kernel.llm.sched.job import Job
from kernel.llm.sched.ranked import RankedScheduler
from kernel.llm.sched.runqueue import RunQueue


class Priority(RankedScheduler):
    """A waiting job's effective priority is priority + aging_rate * (seconds waiting); a running
    job's is its priority. Free slots go to the highest effective priority. A waiting job
    displaces a running one that has had its quantum (`quantum_tokens`) only when it is at
    least one whole level above it, so equal priorities never preempt each other.

    Every waiting job ages at the same rate, so their order never changes while they wait: it is
    the static key queued_at - priority/aging_rate, kept in a sorted queue.

    Bound (P the highest priority any job has, c the capacity, Q the quantum, every batched job
    served at least one token a step): a job with priority p that has waited
    D = (P + 1 - p) / aging_rate seconds outranks every running job and everything that queues
    after it; if k other jobs wait at the first step after D, it is in the batch within
    ceil((k+1)/c)*Q more steps. With aging_rate 0 this is strict priority and has no bound.
    """

    def __init__(self, *, aging_rate: float = 0.1, quantum_tokens: int = 16,
                 budget: Budget | None = None) -> None:
        super().__init__(budget=budget)
        if not aging_rate >= 0:
            raise ValueError("aging_rate must be >= 0")
        if quantum_tokens < 1:
            raise ValueError("quantum_tokens must be >= 1")
        self.aging_rate = aging_rate
        self.quantum_tokens = quantum_tokens
        if aging_rate > 0:
            self._queue_by_urgency = RunQueue(
                key=lambda job: (job.queued_at - job.priority / aging_rate,))
        else:
            self._queue_by_urgency = RunQueue(key=lambda job: (-job.priority, job.queued_at))

    def effective(self, job: Job, now: float) -> float:
        """A waiting job's priority after aging."""
        return job.priority + self.aging_rate * (now - job.queued_at)

    def _enqueue(self, job: Job) -> None:
        self._queue_by_urgency.add(job)

    def _dequeue(self, job: Job) -> None:
        self._queue_by_urgency.remove(job)

    def _order(self, now: float) -> Iterable[Job]:
        return self._queue_by_urgency

    def _keep_key(self, job: Job, now: float) -> tuple[Any, ...]:
        return -job.priority, job.slice_start, job.id  # the newest of the lowest yields first

    def _protected(self, job: Job, now: float) -> bool:
        return job.slice_used < self.quantum_tokens

    def _beats(self, waiting: Job, running: Job, now: float) -> bool:
        return self.effective(waiting, now) >= running.priority + 1
