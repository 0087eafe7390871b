"""Memory pressure: the batch size a KV-memory limit allows, and which saved KV must go."""

from __future__ import annotations

from collections.abc import Callable

from kernel.llm.sched.job import Plan
from kernel.llm.sched.scheduler import Scheduler


class MemoryPressure:
    """Fits the batch to a KV-memory limit; the policy still decides who runs.

    Before each step it reads the KV bytes held (rows plus snapshots) and moves the capacity it
    gives the policy: over the limit, one place fewer than the jobs running (so the policy
    switches one out); under 80% of it, one place more, up to `max_batch`; between the two it
    holds still, so the batch does not flap. While memory is short the plan says so: its
    switches drop their KV (`Plan.recompute`) and the snapshots held by jobs that were
    waiting go too (`Plan.drop`). A context switch for time (a slice, a higher priority) keeps
    a snapshot, since on a CPU recomputing costs a whole prefill; a switch for memory must not,
    since a snapshot would keep the very memory that is short. A `limit` of 0 means none.
    """

    LOW_WATER = 0.8

    def __init__(self, limit: int, max_batch: int) -> None:
        if limit < 0 or max_batch < 1:
            raise ValueError("limit must be >= 0 and max_batch >= 1")
        self.limit = limit
        self.max_batch = max_batch
        self.capacity = max_batch
        self.preemptions = 0  # switches made while memory was short

    def schedule(self, sched: Scheduler, now: float, held: Callable[[], int]) -> Plan:
        """`sched.schedule` at the capacity the memory `held()` (bytes) leaves; read only when
        there is a limit, since measuring it walks every sequence."""
        if not self.limit:
            return sched.schedule(now, self.capacity)
        short = self.short(held(), len(sched.running()))
        drop = sched.waiting() if short else []
        plan = sched.schedule(now, self.capacity)
        if short:
            plan.recompute, plan.drop = True, drop
            self.preemptions += len(plan.preempt)
        return plan

    def short(self, held: int, running: int) -> bool:
        """Move the capacity for `held` bytes with `running` jobs in the batch; True while
        memory is short."""
        if held > self.limit:
            self.capacity = max(1, min(self.capacity, running) - 1)
            return True
        if held < self.limit * self.LOW_WATER:
            self.capacity = min(self.max_batch, self.capacity + 1)
        return False
