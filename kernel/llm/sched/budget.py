"""Per-agent limits on jobs in flight and on tokens served, and the ledger that enforces them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kernel.llm.sched.job import Job


class BudgetExceeded(Exception):
    """An agent asked for more than its budget allows; the kernel answers EQUOTA."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """One agent's limits; None means unlimited."""

    max_jobs: int | None = None  # jobs in flight (waiting or running) at once
    max_tokens: int | None = None  # tokens served over the agent's life, prompt plus generated

    def __post_init__(self) -> None:
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ValueError("max_jobs must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


class Budget:
    """Counts each agent's jobs in flight and tokens served against its limits.

    A job's whole prompt is committed when it is admitted (it cannot be half-served usefully),
    and each job in a batch generates at most one token per step (the local backend keeps
    speculative decoding off for the jobs of an agent with a token limit). So an agent's room is
    limit - used - unprefilled prompts, and letting at most `room` of its jobs into a step keeps
    it within budget however the engine chunks prefill. An agent with no room left can never
    generate again: the scheduler stops its jobs.
    """

    def __init__(self, default: Limits | None = None,
                 limits: Mapping[str, Limits] | None = None) -> None:
        self.default = default or Limits()
        self._limits = dict(limits or {})
        self._used: dict[str, int] = {}
        self._jobs: dict[str, int] = {}  # agents with jobs in flight -> how many
        self._pending: dict[str, int] = {}  # committed prompt tokens not yet prefilled

    def set_limits(self, agent: str, limits: Limits) -> None:
        self._limits[agent] = limits

    def limits(self, agent: str) -> Limits:
        return self._limits.get(agent, self.default)

    def used(self, agent: str) -> int:
        """Tokens served to the agent so far."""
        return self._used.get(agent, 0)

    def jobs(self, agent: str) -> int:
        """The agent's jobs in flight."""
        return self._jobs.get(agent, 0)

    def room(self, agent: str) -> int | None:
        """Tokens the agent may still generate, once its committed prompts are served."""
        limit = self.limits(agent).max_tokens
        if limit is None:
            return None
        return limit - self.used(agent) - self._pending.get(agent, 0)

    def admit(self, job: Job) -> None:
        """Take `job` into flight, or raise BudgetExceeded and change nothing."""
        limits = self.limits(job.agent)
        jobs = self.jobs(job.agent)
        if limits.max_jobs is not None and jobs >= limits.max_jobs:
            raise BudgetExceeded(
                f"{job.agent} has {jobs} jobs in flight (limit {limits.max_jobs})")
        room = self.room(job.agent)
        if room is not None and job.prompt_tokens + 1 > room:
            raise BudgetExceeded(
                f"{job.agent} has {max(room, 0)} tokens of budget left; job {job.id} needs"
                f" {job.prompt_tokens} for its prompt and at least 1 to generate")
        self._jobs[job.agent] = jobs + 1
        self._pending[job.agent] = self._pending.get(job.agent, 0) + job.prompt_tokens

    def charge(self, job: Job, prefill: int, decode: int) -> None:
        """Record one step's service to `job` (already admitted)."""
        self._used[job.agent] = self.used(job.agent) + prefill + decode
        self._pending[job.agent] -= prefill

    def release(self, job: Job) -> None:
        """`job` left flight (finished, cancelled or stopped): its unserved prompt is freed."""
        self._pending[job.agent] -= job.prompt_tokens - job.prefilled
        self._jobs[job.agent] -= 1
        if not self._jobs[job.agent]:
            del self._jobs[job.agent], self._pending[job.agent]

    def caps(self) -> dict[str, int]:
        """Room of every agent in flight that has a token limit."""
        rooms = {agent: self.room(agent) for agent in self._jobs}
        return {agent: room for agent, room in rooms.items() if room is not None}

    def agents(self) -> set[str]:
        """Agents the ledger holds anything for: jobs in flight, tokens served, own limits."""
        return {*self._jobs, *self._used, *self._limits}

    def forget(self, agent: str) -> None:
        """Drop an agent that has exited; its limits, if set explicitly, are dropped too."""
        if agent in self._jobs:
            raise ValueError(f"{agent} still has jobs in flight")
        self._used.pop(agent, None)
        self._limits.pop(agent, None)


def token_budget(max_tokens: int) -> Budget | None:
    """The budget of a model's `agent_max_tokens` (0: none): that many tokens per agent, prompt
    plus generated, over its life. Its other cap, `agent_max_concurrent`, is enforced before a
    call is queued (`LLMCore.chat`), so the scheduler never sees more."""
    return Budget(Limits(max_tokens=max_tokens)) if max_tokens else None
