"""Selection shared by the ranking policies: fill free slots in order, swap only when beaten."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Any

from kernel.llm.sched.job import Job
from kernel.llm.sched.scheduler import Scheduler, Slots


class RankedScheduler(Scheduler):
    """A policy that ranks waiting jobs and says when one may displace a running job.

    Each step: running jobs still inside their slice (quantum) are kept; free slots go to
    waiting jobs in rank order; then, with no slot free, the best waiting job displaces the worst
    running job past its slice only if it `_beats` it, and so on pairwise until one does not.
    A job is never preempted while a slot is free, and never for one that does not beat it, so
    equals do not thrash. Preemption is forced only when capacity or a budget cap shrinks.
    `_beats` must be monotone: a better-ranked waiting job beats whatever a worse one beats.
    """

    def _select(self, now: float, slots: Slots) -> tuple[list[Job], list[Job]]:
        incumbents = list(self._running.values())
        preempt: list[Job] = []
        if not slots.fill(incumbents):  # capacity or a budget cap shrank: the worst must go
            ranked, incumbents = sorted(incumbents, key=lambda j: self._keep_key(j, now)), []
            for job in ranked:
                (incumbents if slots.take(job) else preempt).append(job)
        kept: list[Job] = []
        past: list[Job] = []  # running past their slice: may be displaced
        for job in incumbents:
            (kept if self._protected(job, now) else past).append(job)
        if self._waiting:
            past.sort(key=lambda job: self._keep_key(job, now))
        admitted: list[Job] = []
        for job in self._order(now):
            if slots.free > 0:
                if slots.take(job):
                    admitted.append(job)
                continue
            if not past or not self._beats(job, past[-1], now):
                break
            victim = past.pop()
            slots.give(victim)
            if slots.take(job):
                preempt.append(victim)
                admitted.append(job)
            else:  # its agent is at its budget cap
                slots.take(victim)
                past.append(victim)
        return [*kept, *past, *admitted], preempt

    @abstractmethod
    def _order(self, now: float) -> Iterable[Job]:
        """Waiting jobs, best first; consumed lazily."""

    @abstractmethod
    def _keep_key(self, job: Job, now: float) -> tuple[Any, ...]:
        """Sort key among running jobs, best to keep first."""

    @abstractmethod
    def _protected(self, job: Job, now: float) -> bool:
        """A running job that may not be displaced yet (its slice or quantum is not used up)."""

    @abstractmethod
    def _beats(self, waiting: Job, running: Job, now: float) -> bool:
        """Whether `waiting` is enough better than `running` to be worth a context switch."""
