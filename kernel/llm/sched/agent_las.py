"""Agent-level least attained service (Autellix PLAS): the agent served least goes first."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Any

from kernel.llm.sched.budget import Budget
from kernel.llm.sched.job import Job
from kernel.llm.sched.ranked import RankedScheduler
from kernel.llm.sched.runqueue import RunQueue


class AgentLAS(RankedScheduler):
    """Schedules agents, not calls: a job's rank is its agent's attained service, the tokens
    served to all the agent's jobs so far, finished ones included. Service is bucketed into
    levels at `thresholds` (level i holds service in [thresholds[i-1], thresholds[i])), so
    agents with similar service tie and do not thrash. Waiting jobs go by (level, time queued);
    a waiting job displaces a running one past its quantum only from a strictly lower level.

    Anti-starvation: a job that has waited `starvation_s` is promoted above every level while it
    waits (oldest first); once admitted it runs at its agent's level again.

    Bound (c the capacity, Q the quantum, every batched job served at least one token a step):
    if k other jobs wait at the first step at least starvation_s after a job queued, it is in
    the batch within ceil((k+1)/c)*Q more steps: it beats every running job, and every job that
    queues later is behind it.
    """

    def __init__(self, *, thresholds: Sequence[int] = (1_000, 4_000, 16_000, 64_000),
                 starvation_s: float = 10.0, quantum_tokens: int = 16,
                 budget: Budget | None = None) -> None:
        super().__init__(budget=budget)
        self.thresholds = tuple(thresholds)
        if any(t <= 0 for t in self.thresholds) or list(self.thresholds) != sorted(
                set(self.thresholds)):
            raise ValueError("thresholds must be positive and strictly increasing")
        if not starvation_s > 0:
            raise ValueError("starvation_s must be > 0")
        if quantum_tokens < 1:
            raise ValueError("quantum_tokens must be >= 1")
        self.starvation_s = starvation_s
        self.quantum_tokens = quantum_tokens
        self._service: dict[str, int] = {}
        self._by_agent: dict[str, dict[int, Job]] = {}  # waiting jobs of each agent
        self._queue_by_level = RunQueue(key=lambda job: (self.level(job.agent), job.queued_at))

    def service(self, agent: str) -> int:
        """Tokens served to all of the agent's jobs."""
        return self._service.get(agent, 0)

    def level(self, agent: str) -> int:
        return bisect_right(self.thresholds, self.service(agent))

    def promoted(self, job: Job, now: float) -> bool:
        return now - job.queued_at >= self.starvation_s

    def _enqueue(self, job: Job) -> None:
        self._by_agent.setdefault(job.agent, {})[job.id] = job
        self._queue_by_level.add(job)

    def _dequeue(self, job: Job) -> None:
        jobs = self._by_agent[job.agent]
        del jobs[job.id]
        if not jobs:
            del self._by_agent[job.agent]
        self._queue_by_level.remove(job)

    def _served(self, job: Job, prefill: int, decode: int) -> None:
        before = self.level(job.agent)
        self._service[job.agent] = self.service(job.agent) + prefill + decode
        if self.level(job.agent) != before:
            for waiting in self._by_agent.get(job.agent, {}).values():
                self._queue_by_level.remove(waiting)  # re-keyed at the agent's new level
                self._queue_by_level.add(waiting)

    def _forget(self, agent: str) -> None:
        self._service.pop(agent, None)

    def _accounted(self) -> set[str]:
        return set(self._service)

    def _order(self, now: float) -> Iterator[Job]:
        for job in self._waiting.values():  # queued_at order: the promoted are a prefix
            if not self.promoted(job, now):
                break
            yield job
        for job in self._queue_by_level:
            if not self.promoted(job, now):
                yield job

    def _keep_key(self, job: Job, now: float) -> tuple[Any, ...]:
        return self.level(job.agent), job.slice_start, job.id

    def _protected(self, job: Job, now: float) -> bool:
        return job.slice_used < self.quantum_tokens

    def _beats(self, waiting: Job, running: Job, now: float) -> bool:
        rank = -1 if self.promoted(waiting, now) else self.level(waiting.agent)
        return rank < self.level(running.agent)
