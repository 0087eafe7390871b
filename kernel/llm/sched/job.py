"""A generation request as the scheduler sees it, and the plan for one engine step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(eq=False)
class Job:
    """One generation request; the kernel fills the first seven fields, the scheduler the rest."""

    id: int
    agent: str  # the principal that submitted it, e.g. "agent:7"
    arrival: float  # clock time the request reached the kernel
    prompt_tokens: int  # tokens to prefill
    max_tokens: int  # tokens it may generate
    priority: int = 0  # larger is more urgent (priority policy)
    weight: float = 1.0  # the agent's fair-share weight, stamped on each of its jobs

    prefilled: int = field(default=0, init=False)  # prompt tokens prefilled so far
    generated: int = field(default=0, init=False)  # tokens generated so far
    queued_at: float = field(default=0.0, init=False)  # last entry into the waiting queue
    first_run: float | None = field(default=None, init=False)  # first admission to a batch
    slice_start: float = field(default=0.0, init=False)  # start of the current slice (quantum)
    slice_used: int = field(default=0, init=False)  # tokens served in the current slice
    preemptions: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"job {self.id}: prompt_tokens must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"job {self.id}: max_tokens must be >= 1")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"job {self.id}: weight must be a positive number")

    @property
    def served(self) -> int:
        """Tokens the engine has processed for this job: prompt prefilled plus generated."""
        return self.prefilled + self.generated


@dataclass
class Plan:
    """What the engine does next: the batch, who leaves it, who is stopped for good, and (from
    `MemoryPressure`, while KV memory is short) which saved contexts must go."""

    run: list[Job] = field(default_factory=list)  # the batch for the next step
    preempt: list[Job] = field(default_factory=list)  # were running; save their context now
    stop: list[Job] = field(default_factory=list)  # budget spent, already forgotten: EQUOTA
    recompute: bool = False  # switch `preempt` out without a KV snapshot: memory is short
    drop: list[Job] = field(default_factory=list)  # were waiting; drop their KV snapshots
