"""Scheduling policies by name, as the kernel's configuration spells them."""

from __future__ import annotations

import inspect
from typing import Any

from kernel.llm.sched.agent_las import AgentLAS
from kernel.llm.sched.budget import Budget
from kernel.llm.sched.fair_share import FairShare
from kernel.llm.sched.fifo import FIFO
from kernel.llm.sched.priority import Priority
from kernel.llm.sched.round_robin import RoundRobin
from kernel.llm.sched.scheduler import Scheduler

POLICIES: dict[str, type[Scheduler]] = {
    "fifo": FIFO,
    "rr": RoundRobin,
    "priority": Priority,
    "fair": FairShare,
    "las": AgentLAS,
}


def make_scheduler(name: str, *, budget: Budget | None = None, **options: Any) -> Scheduler:
    """Build the policy called `name` with its `options`; ValueError names what is wrong."""
    policy = POLICIES.get(name)
    if policy is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(POLICIES)}")
    known = [p for p in inspect.signature(policy).parameters if p != "budget"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"scheduler {name!r} has no option {', '.join(map(repr, unknown))};"
                         f" it takes {', '.join(known) or 'none'}")
    return policy(budget=budget, **options)
