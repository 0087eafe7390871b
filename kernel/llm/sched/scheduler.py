"""The scheduler interface: jobs in, a plan per engine step out; policies fill in `_select`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping

from kernel.llm.sched.budget import Budget
from kernel.llm.sched.job import Job, Plan


class Slots:
    """The batch being filled: free places, and how many more jobs each capped agent may add."""

    def __init__(self, capacity: int, caps: Mapping[str, int]) -> None:
        self.free = capacity
        self._caps = dict(caps)

    def fill(self, jobs: list[Job]) -> bool:
        """Claim places for all of `jobs` if they all fit; otherwise claim none."""
        if len(jobs) > self.free:
            return False
        if self._caps:
            wanted = Counter(job.agent for job in jobs if job.agent in self._caps)
            if any(n > self._caps[agent] for agent, n in wanted.items()):
                return False
            for agent, n in wanted.items():
                self._caps[agent] -= n
        self.free -= len(jobs)
        return True

    def take(self, job: Job) -> bool:
        """Claim a place for `job`; False if the batch is full or its agent is at its cap."""
        if self.free <= 0:
            return False
        cap = self._caps.get(job.agent)
        if cap is not None:
            if cap <= 0:
                return False
            self._caps[job.agent] = cap - 1
        self.free -= 1
        return True

    def give(self, job: Job) -> None:
        """Hand back the place `job` held."""
        self.free += 1
        if job.agent in self._caps:
            self._caps[job.agent] += 1


class Scheduler(ABC):
    """Decides, before every engine step, which jobs are in the batch; never touches tensors.

    Jobs are either waiting or running. Each step the model's backend calls `schedule` (through
    `MemoryPressure`, which sets the capacity; the plan is already applied to these
    collections), has the engine run the batch, `account`s each job in it and `finish`es
    those that completed (kernel/llm/backends.py, `LocalBackend.step`). `now` is a monotonic
    clock and must never go backwards.
    """

    def __init__(self, *, budget: Budget | None = None) -> None:
        self.budget = budget
        self._waiting: dict[int, Job] = {}  # in the order they entered the queue
        self._running: dict[int, Job] = {}  # in the order they were admitted
        self._now = -math.inf
        # Agents whose requests wait, running ones preempted, until resumed (proc.suspend).
        self.paused: set[str] = set()

    def submit(self, job: Job, now: float) -> None:
        """Queue a new job; raises BudgetExceeded (nothing queued) if its agent is over budget."""
        self._tick(now)
        if job.id in self._waiting or job.id in self._running:
            raise ValueError(f"job {job.id} is already submitted")
        if self.budget is not None:
            self.budget.admit(job)
        self._queue(job, now)

    def finish(self, job_id: int, now: float) -> None:
        """Forget a job that finished or was cancelled, waiting or running."""
        self._tick(now)
        job = self._waiting.pop(job_id, None)
        if job is not None:
            self._dequeue(job)
        elif (job := self._running.pop(job_id, None)) is None:
            raise KeyError(f"job {job_id} is not scheduled")
        if self.budget is not None:
            self.budget.release(job)

    def account(self, job_id: int, prefill: int, decode: int, now: float) -> None:
        """Record the service a running job got in the last step.

        `prefill` counts prompt tokens prefilled for the first time (recomputing a preempted
        context is the engine's cost, not the agent's service); `decode` counts the tokens
        generated: 0 or 1, or more when the engine accepted a speculative draft.
        """
        self._tick(now)
        job = self._running.get(job_id)
        if job is None:
            raise KeyError(f"job {job_id} is not running")
        if not 0 <= prefill <= job.prompt_tokens - job.prefilled:
            raise ValueError(f"job {job_id}: prefill {prefill} is outside its unprefilled prompt")
        if not 0 <= decode <= job.max_tokens - job.generated:
            raise ValueError(f"job {job_id}: {decode} tokens generated, outside 0.."
                             f"{job.max_tokens - job.generated} (max_tokens)")
        if decode and job.prefilled + prefill < job.prompt_tokens:
            raise ValueError(f"job {job_id}: cannot generate before its prompt is prefilled")
        job.prefilled += prefill
        job.generated += decode
        job.slice_used += prefill + decode
        if self.budget is not None:
            self.budget.charge(job, prefill, decode)
        self._served(job, prefill, decode)

    def schedule(self, now: float, capacity: int) -> Plan:
        """Choose the batch for the next step (at most `capacity` jobs) and apply the choice."""
        self._tick(now)
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        stop = self._stop_spent()
        caps = self.budget.caps() if self.budget else {}
        if self.paused:  # a paused agent gets no place in the batch, as if capped at zero
            caps = {**caps, **dict.fromkeys(self.paused, 0)}
        run, preempt = self._select(now, Slots(capacity, caps))
        for job in run:
            if job.id in self._waiting:
                del self._waiting[job.id]
                self._dequeue(job)
                self._running[job.id] = job
                job.slice_start, job.slice_used = now, 0
                if job.first_run is None:
                    job.first_run = now
        for job in preempt:
            del self._running[job.id]
            job.preemptions += 1
            self._queue(job, now)
        return Plan(run, preempt, stop)

    def waiting(self) -> list[Job]:
        """Waiting jobs, in the order they entered the queue."""
        return list(self._waiting.values())

    def running(self) -> list[Job]:
        """Running jobs, in the order they were admitted."""
        return list(self._running.values())

    def agents(self) -> set[str]:
        """Every agent this scheduler holds state for: jobs, budget, policy accounting. The
        kernel calls `forget_agent` when an agent ends for good, so this stays bounded by the
        agents alive."""
        jobs = {job.agent for job in (*self._waiting.values(), *self._running.values())}
        return jobs | (self.budget.agents() if self.budget else set()) | self._accounted()

    def forget_agent(self, agent: str) -> None:
        """Drop the accounting of an agent that has exited, so a reused name starts afresh."""
        if any(job.agent == agent for job in (*self._waiting.values(), *self._running.values())):
            raise ValueError(f"{agent} still has jobs")
        if self.budget is not None:
            self.budget.forget(agent)
        self._forget(agent)

    def _tick(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"the clock went backwards: {now} < {self._now}")
        self._now = now

    def _queue(self, job: Job, now: float) -> None:
        job.queued_at = now
        self._waiting[job.id] = job
        self._enqueue(job)

    def _stop_spent(self) -> list[Job]:
        """Remove every job of an agent whose token budget is spent: it can never generate."""
        if self.budget is None:
            return []
        spent = {agent for agent, room in self.budget.caps().items() if room <= 0}
        if not spent:
            return []
        stop = [job for job in (*self._waiting.values(), *self._running.values())
                if job.agent in spent]
        for job in stop:
            self.finish(job.id, self._now)
        return stop

    @abstractmethod
    def _select(self, now: float, slots: Slots) -> tuple[list[Job], list[Job]]:
        """Return (batch, preempted): the batch holds running jobs kept and waiting ones admitted;
        preempted are running jobs left out. Must not change `_waiting` or `_running`."""

    def _enqueue(self, job: Job) -> None:  # noqa: B027 - optional hook
        """A job entered `_waiting`; policies that keep their own order add it there."""

    def _dequeue(self, job: Job) -> None:  # noqa: B027 - optional hook
        """A job left `_waiting`."""

    def _served(self, job: Job, prefill: int, decode: int) -> None:  # noqa: B027 - optional hook
        """A running job was served; policies that account per agent record it."""

    def _forget(self, agent: str) -> None:  # noqa: B027 - optional hook
        """Drop per-agent accounting."""

    def _accounted(self) -> set[str]:
        """Agents with per-agent accounting (the policies that keep some override this)."""
        return set()
