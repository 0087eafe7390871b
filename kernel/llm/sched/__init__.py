"""LLM scheduling policy: which jobs share the next engine step; pure Python, no tensors.

The engine owns the mechanism (batches, KV, context switches); a `Scheduler` only decides,
nano-vllm style: `waiting()` and `running()` collections and a `schedule()` per step::

    sched = make_scheduler("fair", budget=Budget(Limits(max_jobs=8)))  # config name + options
    sched.submit(Job(id, agent, arrival, prompt_tokens, max_tokens, priority, weight), now)
    # every engine step:
    plan = sched.schedule(now, capacity)   # Plan(run, preempt, stop), already applied
    #   save the context of plan.preempt; drop plan.stop and fail them with EQUOTA
    #   run plan.run: decode the running, prefill (in chunks) or resume the admitted
    sched.account(job.id, prefill, decode, now)   # each job in plan.run; decode is 0 or 1
    sched.finish(job.id, now)                     # each job that completed; also cancels

`submit` raises `BudgetExceeded(reason)` when the agent is over its budget (EQUOTA);
`forget_agent` drops the accounting of an agent that has ended for good (the kernel tells each
model's scheduler), so `agents()` stays bounded by the agents alive. `now` is monotonic.

A KV-memory limit sits in front of the policy: `MemoryPressure(limit_bytes, max_batch)
.schedule(sched, now, held)` moves the capacity with the bytes held and marks the plan
`recompute` (switch out without a snapshot) and `drop` (waiting jobs' snapshots go) while
memory is short. The model's worker (kernel/llm/backends.py) applies the plan to the engine.

| name       | class        | options                                          | preempts        |
|------------|--------------|--------------------------------------------------|-----------------|
| `fifo`     | `FIFO`       | -                                                | never           |
| `rr`       | `RoundRobin` | slice_tokens=64 or slice_s                       | at slice end    |
| `priority` | `Priority`   | aging_rate=0.1, quantum_tokens=16                | for one higher  |
| `fair`     | `FairShare`  | input_weight=1.0, output_weight=2.0 (VTC)        | never           |
| `las`      | `AgentLAS`   | thresholds, starvation_s=10.0, quantum_tokens=16 | for lower level |

A preemption costs a context switch (a KV copy or a recompute), so no policy preempts while a
slot is free or before the running job has had its slice or quantum, priority and LAS never
for an equal, and only a shrinking capacity or budget cap forces one. Each class
docstring states the bound it guarantees with a proof sketch (tests/kernel/llm/test_sched*.py checks
each); the bounds assume the engine serves every job in `plan.run` at least one token per step
and that no budget caps an agent.
`schedule()` is O(n log n) at worst and near O(batch) in a steady state: about 0.01 ms with
1000 jobs in flight and a batch of 32.
"""

from kernel.llm.sched.agent_las import AgentLAS
from kernel.llm.sched.budget import Budget, BudgetExceeded, Limits, token_budget
from kernel.llm.sched.factory import POLICIES, make_scheduler
from kernel.llm.sched.fair_share import FairShare
from kernel.llm.sched.fifo import FIFO
from kernel.llm.sched.job import Job, Plan
from kernel.llm.sched.pressure import MemoryPressure
from kernel.llm.sched.priority import Priority
from kernel.llm.sched.round_robin import RoundRobin
from kernel.llm.sched.scheduler import Scheduler

__all__ = [
    "FIFO",
    "POLICIES",
    "AgentLAS",
    "Budget",
    "BudgetExceeded",
    "FairShare",
    "Job",
    "Limits",
    "MemoryPressure",
    "Plan",
    "Priority",
    "RoundRobin",
    "Scheduler",
    "make_scheduler",
    "token_budget",
]
