"""Hypothesis state machines for kernel.llm.sched: every policy against a fake clock and engine.

Besides jobs arriving, running, finishing and being cancelled, agents are paused and resumed
(proc.suspend), the capacity moves mid-run (MemoryPressure), and agents that ended are
forgotten; every machine bounds how often one job is preempted, and fair share bounds how long
one job waits.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kernel.llm.sched import (
    POLICIES,
    Budget,
    BudgetExceeded,
    Job,
    Limits,
    Plan,
    Scheduler,
    make_scheduler,
)
from tests.conftest import DEEP

AGENTS = [f"agent:{i}" for i in range(4)]
PMAX = 3  # priorities are drawn from 0..PMAX: the P of the priority bound
EPS = 1e-9
MACHINE = settings(max_examples=50 * DEEP, stateful_step_count=50, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

JOB = st.tuples(  # agent, prompt_tokens, max_tokens, priority, weight
    st.sampled_from(AGENTS), st.integers(0, 24), st.integers(1, 16), st.integers(0, PMAX),
    st.sampled_from([0.5, 1.0, 2.0]))


def checked(method: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine broken when a rule or invariant fails, so teardown does not drain it."""

    @functools.wraps(method)
    def wrapper(self: SchedulerMachine, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return wrapper


def token(job_id: int, i: int) -> int:
    return hash((job_id, i)) % 1000


@dataclass
class Context:
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)


class FakeEngine:
    """Generates token i of job j as hash((j, i)) % 1000; saves contexts on preempt, resumes them.

    A step prefills up to `chunk` prompt tokens; the step that ends the prompt also generates.
    """

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.batch: dict[int, Context] = {}
        self.saved: dict[int, Context] = {}

    def apply(self, plan: Plan) -> None:
        for job in plan.preempt:
            ctx = self.batch.pop(job.id)
            self.saved[job.id] = Context(ctx.prefilled, list(ctx.tokens))
        for job in plan.run:
            if job.id not in self.batch:
                self.batch[job.id] = self.saved.pop(job.id, None) or Context()

    def serve(self, job: Job) -> tuple[int, int]:
        ctx = self.batch[job.id]
        assert (ctx.prefilled, len(ctx.tokens)) == (job.prefilled, job.generated)
        prefill = min(self.chunk, job.prompt_tokens - ctx.prefilled)
        ctx.prefilled += prefill
        decode = 0
        if ctx.prefilled == job.prompt_tokens:
            ctx.tokens.append(token(job.id, len(ctx.tokens)))
            decode = 1
        return prefill, decode

    def drop(self, job_id: int) -> list[int]:
        ctx = self.batch.pop(job_id, None) or self.saved.pop(job_id, None) or Context()
        return ctx.tokens


@dataclass
class Record:
    """What the test knows about a job, independently of the scheduler."""

    job: Job
    state: str  # waiting | running | finished | cancelled | stopped
    queued_at: float
    seq: int  # order of entry into the waiting queue
    slice_used: int = 0
    slice_start: float = 0.0
    started: bool = False
    mark: tuple[int, float, int] | None = None  # (call, time, others waiting) the bound counts from
    tokens: list[int] = field(default_factory=list)
    forced: int = 0  # preemptions a shrinking capacity or a pause forced
    chosen: int = 0  # preemptions the policy chose (a slice or quantum used up)
    running_s: float = 0.0  # length of the slices it was preempted from, for slices in seconds


class SchedulerMachine(RuleBasedStateMachine):
    """Submit, step, cancel and wait at random; check the plan and the bookkeeping every time."""

    budgeted = False

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0
        self.calls = 0
        self.last_call: float | None = None
        self.max_gap = 0.0
        self.ids = itertools.count()
        self.seqs = itertools.count()
        self.jobs: dict[int, Record] = {}
        self.active: dict[int, Record] = {}  # waiting or running
        self.service: Counter[str] = Counter()  # tokens served per agent, finished jobs included
        self.capacity = 1
        self.engine = FakeEngine(1)
        self.paused: set[str] = set()  # shared with the scheduler, as the model worker does
        self.pauses: Counter[str] = Counter()  # pause events per agent
        self.shrinks = 0  # capacity decreases
        self.forced_step = False  # this step's capacity is below the unpaused jobs running
        self.broken = False  # a check failed: teardown must not pile a second failure on it
        self.sched: Scheduler

    # -- setup and rules -------------------------------------------------------------------

    @initialize(capacity=st.integers(1, 4), chunk=st.sampled_from([1, 3, 8, 64]), data=st.data())
    def setup(self, capacity: int, chunk: int, data: st.DataObject) -> None:
        self.capacity = capacity
        self.engine = FakeEngine(chunk)
        self.sched = self.build(data)
        self.sched.paused = self.paused

    def build(self, data: st.DataObject) -> Scheduler:
        raise NotImplementedError

    @rule(spec=JOB)
    @checked
    def submit(self, spec: tuple[str, int, int, int, float]) -> None:
        self.submit_one(*spec)

    @rule(specs=st.lists(JOB, min_size=2, max_size=5))
    @checked
    def burst(self, specs: list[tuple[str, int, int, int, float]]) -> None:
        for spec in specs:
            self.submit_one(*spec)

    def submit_one(self, agent: str, prompt: int, max_tokens: int, priority: int,
                   weight: float) -> None:
        job = Job(next(self.ids), agent, self.clock, prompt, max_tokens, priority, weight)
        expected = self.refusal(job)
        try:
            self.sched.submit(job, self.clock)
        except BudgetExceeded:
            assert expected, f"job {job.id} refused within budget"
            return
        assert not expected, f"job {job.id} admitted over budget: {expected}"
        self.jobs[job.id] = self.active[job.id] = Record(job, "waiting", self.clock,
                                                          next(self.seqs))
        self.submitted(job)
        self.after_event()

    @rule(dt=st.sampled_from([0.0, 0.1, 0.25, 1.0]), count=st.integers(1, 8))
    @checked
    def step(self, dt: float, count: int) -> None:
        for _ in range(count):
            self.run_step(dt)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    @checked
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.live())))
        self.sched.finish(job_id, self.clock)
        self.end(job_id, "cancelled")
        self.after_event()

    @rule(dt=st.sampled_from([0.5, 2.0, 7.0]))
    def wait(self, dt: float) -> None:
        self.clock += dt

    @rule(agent=st.sampled_from(AGENTS))
    @checked
    def pause(self, agent: str) -> None:
        self.paused.add(agent)
        self.pauses[agent] += 1
        self.restart_bounds()

    @precondition(lambda self: self.paused)
    @rule(data=st.data())
    @checked
    def resume(self, data: st.DataObject) -> None:
        self.paused.discard(data.draw(st.sampled_from(sorted(self.paused))))
        self.restart_bounds()

    @rule(capacity=st.integers(1, 4))
    @checked
    def resize(self, capacity: int) -> None:
        self.shrinks += capacity < self.capacity
        self.capacity = capacity
        self.restart_bounds()

    @rule(agent=st.sampled_from(AGENTS))
    @checked
    def forget(self, agent: str) -> None:
        if any(self.jobs[i].job.agent == agent for i in self.live()):
            with pytest.raises(ValueError):
                self.sched.forget_agent(agent)
            return
        self.sched.forget_agent(agent)
        assert agent not in self.sched.agents(), f"{agent} still accounted after forget"
        self.forgotten(agent)

    def restart_bounds(self) -> None:
        """The wait bounds count from the last pause, resume or resize: start them again."""
        for rec in self.active.values():
            rec.mark = None

    def teardown(self) -> None:
        if not hasattr(self, "sched") or self.broken:
            return
        self.paused.clear()
        # Every step serves some job at least one token, so the work left bounds the steps.
        work = sum(rec.job.prompt_tokens - rec.job.prefilled + rec.job.max_tokens
                   - rec.job.generated for rec in self.active.values())
        for _ in range(work):
            if not self.live():
                break
            self.run_step(0.1)
        assert not self.live(), f"jobs still live after {work} steps with no arrivals"
        for rec in self.jobs.values():
            want = [token(rec.job.id, i) for i in range(rec.job.max_tokens)]
            if rec.state == "finished":
                assert rec.tokens == want
            else:
                assert rec.state in ("cancelled", "stopped")
                assert rec.tokens == want[:len(rec.tokens)]

    # -- one engine step -------------------------------------------------------------------

    def run_step(self, dt: float) -> None:
        self.clock += dt
        if self.last_call is not None:
            self.max_gap = max(self.max_gap, self.clock - self.last_call)
        self.last_call = self.clock
        self.calls += 1
        before = {i: rec.state for i, rec in self.active.items()}
        self.forced_step = sum(1 for i, state in before.items() if state == "running"
                               and self.jobs[i].job.agent not in self.paused) > self.capacity
        self.before_plan()
        plan = self.sched.schedule(self.clock, self.capacity)
        self.check_common(plan, before)
        self.check_plan(plan)
        self.apply(plan)
        self.check_bounds()
        for job in plan.run:
            rec = self.jobs[job.id]
            prefill, decode = self.engine.serve(job)
            self.sched.account(job.id, prefill, decode, self.clock)
            rec.slice_used += prefill + decode
            self.service[job.agent] += prefill + decode
            self.served(job, prefill, decode)
            if job.generated == job.max_tokens:
                self.sched.finish(job.id, self.clock)
                self.end(job.id, "finished")
        self.after_event()

    def apply(self, plan: Plan) -> None:
        for job in plan.stop:
            self.end(job.id, "stopped")
        self.engine.apply(plan)
        for job in plan.preempt:
            rec = self.jobs[job.id]
            rec.running_s += self.clock - rec.slice_start
            rec.state, rec.queued_at, rec.seq = "waiting", self.clock, next(self.seqs)
            if self.forced(job):
                rec.forced += 1
            else:
                rec.chosen += 1
            assert job.preemptions == rec.forced + rec.chosen
        for job in plan.run:
            rec = self.jobs[job.id]
            if rec.state == "waiting":
                self.admitted(rec)
                rec.state, rec.slice_used, rec.slice_start, rec.mark = (
                    "running", 0, self.clock, None)
                rec.started = True
        self.after_event()

    def end(self, job_id: int, state: str) -> None:
        rec = self.active.pop(job_id)
        rec.state = state
        rec.tokens = self.engine.drop(job_id)

    # -- checks ----------------------------------------------------------------------------

    def check_common(self, plan: Plan, before: dict[int, str]) -> None:
        run = [job.id for job in plan.run]
        preempt = [job.id for job in plan.preempt]
        stop = [job.id for job in plan.stop]
        assert len(run) == len(set(run)) and len(preempt) == len(set(preempt))
        assert len(run) <= self.capacity
        assert all(i in before for i in run + stop), "scheduled a job that is not live"
        assert all(before[i] == "running" for i in preempt), "preempted a job not running"
        assert not set(run) & set(preempt) and not set(stop) & set(run + preempt)
        assert not [job for job in plan.run if job.agent in self.paused], "ran a paused agent"
        held = {i for i, state in before.items()
                if state == "running" and self.jobs[i].job.agent in self.paused}
        assert held <= set(preempt + stop), "a paused agent's job kept its place"
        live = sum(1 for i in before if self.jobs[i].job.agent not in self.paused) - len(
            [i for i in stop if self.jobs[i].job.agent not in self.paused])
        if not self.budgeted:
            assert not stop
            assert len(run) == min(self.capacity, live), "left a slot idle with jobs waiting"
            if set(preempt) - held:
                assert len(run) == self.capacity, "preempted with a free slot"

    def forced(self, job: Job) -> bool:
        """Whether a preemption was forced on the policy rather than chosen by it."""
        return job.agent in self.paused or self.forced_step

    @invariant()
    @checked
    def preemptions_bounded(self) -> None:
        """One job is preempted at most once per shrink of the capacity or pause of its agent,
        plus once per slice (quantum) it used up: no job is switched out over and over."""
        if self.budgeted:  # a budget cap shrinking also forces preemptions
            return
        for rec in self.jobs.values():
            assert rec.forced <= self.shrinks + self.pauses[rec.job.agent], (
                f"job {rec.job.id} preempted {rec.forced} times by {self.shrinks} shrinks and"
                f" {self.pauses[rec.job.agent]} pauses")
            bound = self.chosen_bound(rec)
            assert bound is None or rec.chosen <= bound, (
                f"job {rec.job.id} preempted {rec.chosen} times, bound {bound}")

    @invariant()
    @checked
    def collections_agree(self) -> None:
        if not hasattr(self, "sched"):
            return
        waiting = [job.id for job in self.sched.waiting()]
        running = [job.id for job in self.sched.running()]
        assert len(set(waiting + running)) == len(waiting) + len(running)
        assert set(waiting) == {i for i, rec in self.jobs.items() if rec.state == "waiting"}
        assert set(running) == {i for i, rec in self.jobs.items() if rec.state == "running"}
        for job in self.sched.running():
            assert job.generated == len(self.engine.batch[job.id].tokens)

    def live(self) -> list[int]:
        return list(self.active)

    def waiting_records(self, paused: bool = False) -> list[Record]:
        """Waiting jobs; those of paused agents only with `paused` (they cannot be admitted)."""
        return [rec for rec in self.active.values() if rec.state == "waiting"
                and (paused or rec.job.agent not in self.paused)]

    def mark_waiting(self) -> None:
        """Start the bound's count for waiting jobs that are `due` and not yet counted; a paused
        agent's job waits out of the count (the others ahead of it include paused ones)."""
        others = len(self.waiting_records(paused=True)) - 1
        for rec in self.waiting_records(paused=True):
            if rec.job.agent in self.paused:
                rec.mark = None
            elif rec.mark is None and self.is_due(rec):
                rec.mark = (self.calls, self.clock, others)

    # -- hooks for each policy -------------------------------------------------------------

    def refusal(self, job: Job) -> str:
        return ""

    def chosen_bound(self, rec: Record) -> int | None:
        """The most preemptions the policy may choose for this job (None: not bounded here)."""
        return 0

    def forgotten(self, agent: str) -> None:
        self.service[agent] = 0

    def before_plan(self) -> None:
        pass

    def check_plan(self, plan: Plan) -> None:
        pass

    def check_bounds(self) -> None:
        pass

    def is_due(self, rec: Record) -> bool:
        return True

    def submitted(self, job: Job) -> None:
        pass

    def admitted(self, rec: Record) -> None:
        pass

    def served(self, job: Job, prefill: int, decode: int) -> None:
        pass

    def after_event(self) -> None:
        pass

    def split(self, plan: Plan) -> tuple[list[Record], list[Record], list[Record]]:
        """(admitted, kept, left waiting) records, as they stood before the plan."""
        run = {job.id for job in plan.run}
        admitted = [self.jobs[i] for i in run if self.jobs[i].state == "waiting"]
        kept = [self.jobs[i] for i in run if self.jobs[i].state == "running"]
        left = [rec for rec in self.waiting_records() if rec.job.id not in run]
        return admitted, kept, left


def rounds(others: int, capacity: int) -> int:
    return math.ceil((others + 1) / capacity)


class FIFOMachine(SchedulerMachine):
    def build(self, data: st.DataObject) -> Scheduler:
        return make_scheduler("fifo")

    def check_plan(self, plan: Plan) -> None:
        assert all(self.forced(job) for job in plan.preempt), "FIFO chose to preempt"
        admitted, _, left = self.split(plan)
        if admitted and left:
            assert max((r.job.arrival, r.job.id) for r in admitted) < min(
                (w.job.arrival, w.job.id) for w in left), "admitted out of arrival order"


class RoundRobinMachine(SchedulerMachine):
    """Checks queue order and the bound: waiting with k others at step e, in by e+ceil((k+1)/c)*S
    (token slices), or by time t_e + ceil((k+1)/c)*(slice_s + longest step gap)."""

    def build(self, data: st.DataObject) -> Scheduler:
        self.slice_tokens: int | None = None
        self.slice_s: float | None = None
        if data.draw(st.booleans(), label="slice in tokens"):
            self.slice_tokens = data.draw(st.integers(1, 4), label="slice_tokens")
            return make_scheduler("rr", slice_tokens=self.slice_tokens)
        self.slice_s = data.draw(st.sampled_from([0.2, 0.5, 1.0]), label="slice_s")
        return make_scheduler("rr", slice_s=self.slice_s)

    def expired(self, rec: Record) -> bool:
        if self.slice_tokens is not None:
            return rec.slice_used >= self.slice_tokens
        assert self.slice_s is not None
        return self.clock - rec.slice_start >= self.slice_s

    def check_plan(self, plan: Plan) -> None:
        admitted, kept, left = self.split(plan)
        if admitted and left:
            assert max(r.seq for r in admitted) < min(w.seq for w in left), (
                "admitted out of queue order")
        if left:
            assert not [r for r in kept if self.expired(r)], "kept an expired job while one waits"

    def chosen_bound(self, rec: Record) -> int | None:
        if self.slice_tokens is not None:
            return rec.job.served // self.slice_tokens
        assert self.slice_s is not None
        return math.floor(rec.running_s / self.slice_s + EPS)

    def check_bounds(self) -> None:
        self.mark_waiting()
        for rec in self.waiting_records():
            assert rec.mark is not None
            call, since, others = rec.mark
            if self.slice_tokens is not None:
                assert self.calls < call + rounds(others, self.capacity) * self.slice_tokens, (
                    f"job {rec.job.id} starved past the round-robin bound")
            else:
                assert self.slice_s is not None
                limit = since + rounds(others, self.capacity) * (self.slice_s + self.max_gap)
                assert self.clock <= limit + EPS, f"job {rec.job.id} starved past the bound"


class PriorityMachine(SchedulerMachine):
    """Checks effective-priority order and the aging bound: after (P+1-p)/rate seconds of
    waiting with k others, in the batch within ceil((k+1)/c)*Q steps."""

    def build(self, data: st.DataObject) -> Scheduler:
        self.rate = data.draw(st.sampled_from([0.0, 0.5, 2.0]), label="aging_rate")
        self.quantum = data.draw(st.integers(1, 4), label="quantum_tokens")
        return make_scheduler("priority", aging_rate=self.rate, quantum_tokens=self.quantum)

    def effective(self, rec: Record) -> float:
        return rec.job.priority + self.rate * (self.clock - rec.queued_at)

    def check_plan(self, plan: Plan) -> None:
        admitted, kept, left = self.split(plan)
        if not left:
            return
        best_left = max(self.effective(w) for w in left)
        for r in admitted:
            assert best_left <= self.effective(r) + EPS, "admitted out of order"
        for r in kept:
            if r.slice_used >= self.quantum:
                assert best_left < r.job.priority + 1 + EPS, "kept a beaten job"
        for job in plan.preempt:
            if self.forced(job):
                continue
            victim = self.jobs[job.id]
            assert victim.slice_used >= self.quantum, "preempted inside its quantum"
            assert any(self.effective(r) >= victim.job.priority + 1 - EPS for r in admitted)

    def chosen_bound(self, rec: Record) -> int | None:
        return rec.job.served // self.quantum

    def is_due(self, rec: Record) -> bool:
        wait = (PMAX + 1 - rec.job.priority) / self.rate
        return self.clock - rec.queued_at >= wait + EPS

    def check_bounds(self) -> None:
        if not self.rate:
            return
        self.mark_waiting()
        for rec in self.waiting_records():
            if rec.mark is not None:
                call, _, others = rec.mark
                assert self.calls < call + rounds(others, self.capacity) * self.quantum, (
                    f"job {rec.job.id} starved past the aging bound")


class AgentLASMachine(SchedulerMachine):
    """Checks agent-level order (level of attained service, then time queued) and the
    starvation bound: after starvation_s of waiting with k others, in within ceil((k+1)/c)*Q."""

    def build(self, data: st.DataObject) -> Scheduler:
        self.thresholds = data.draw(st.sampled_from([(8, 24, 64), (4, 16), (30,)]))
        self.starvation_s = data.draw(st.sampled_from([0.5, 2.0, 5.0]), label="starvation_s")
        self.quantum = data.draw(st.integers(1, 4), label="quantum_tokens")
        return make_scheduler("las", thresholds=self.thresholds, starvation_s=self.starvation_s,
                              quantum_tokens=self.quantum)

    def level(self, agent: str) -> int:
        return sum(self.service[agent] >= t for t in self.thresholds)

    def promoted(self, rec: Record) -> bool:
        return self.clock - rec.queued_at >= self.starvation_s

    def rank(self, rec: Record) -> tuple[int, float]:
        return (-1 if self.promoted(rec) else self.level(rec.job.agent)), rec.queued_at

    def check_plan(self, plan: Plan) -> None:
        admitted, kept, left = self.split(plan)
        if not left:
            return
        best_left = min(self.rank(w) for w in left)
        for r in admitted:
            assert best_left >= self.rank(r), "admitted out of agent-level order"
        for r in kept:
            if r.slice_used >= self.quantum:
                assert best_left[0] >= self.level(r.job.agent), "kept a beaten job"
        for job in plan.preempt:
            if self.forced(job):
                continue
            victim = self.jobs[job.id]
            assert victim.slice_used >= self.quantum, "preempted inside its quantum"
            assert any(self.rank(r)[0] < self.level(job.agent) for r in admitted)

    def chosen_bound(self, rec: Record) -> int | None:
        return rec.job.served // self.quantum

    def is_due(self, rec: Record) -> bool:
        return self.promoted(rec)

    def check_bounds(self) -> None:
        self.mark_waiting()
        for rec in self.waiting_records():
            if rec.mark is not None:
                call, _, others = rec.mark
                assert self.calls < call + rounds(others, self.capacity) * self.quantum, (
                    f"job {rec.job.id} starved past the LAS bound")


class FairShareMachine(SchedulerMachine):
    """Checks the VTC bound: over any stretch in which two agents both have jobs waiting, their
    weighted service differs by at most 2U, U = max prompt cost + capacity * max output cost."""

    def build(self, data: st.DataObject) -> Scheduler:
        self.w_in = data.draw(st.sampled_from([1.0, 0.5]), label="input_weight")
        self.w_out = data.draw(st.sampled_from([2.0, 1.0]), label="output_weight")
        self.work: Counter[str] = Counter()  # weighted service, as the counters charge it
        self.since: dict[str, tuple[int, dict[str, float]]] = {}  # backlogged: (seq, work then)
        self.order = itertools.count()
        self.max_prompt = self.max_output = 0.0
        return make_scheduler("fair", input_weight=self.w_in, output_weight=self.w_out)

    def submitted(self, job: Job) -> None:
        self.max_prompt = max(self.max_prompt, self.w_in * job.prompt_tokens / job.weight)
        self.max_output = max(self.max_output, self.w_out * job.max_tokens / job.weight)

    def admitted(self, rec: Record) -> None:
        if not rec.started:
            self.work[rec.job.agent] += self.w_in * rec.job.prompt_tokens / rec.job.weight

    def served(self, job: Job, prefill: int, decode: int) -> None:
        self.work[job.agent] += self.w_out * decode / job.weight

    def after_event(self) -> None:
        backlogged = {rec.job.agent for rec in self.waiting_records()}
        for agent in list(self.since):
            if agent not in backlogged:
                del self.since[agent]
        for agent in backlogged - set(self.since):
            self.since[agent] = (next(self.order), dict(self.work))
        bound = 2 * (self.max_prompt + self.capacity * self.max_output) + 1e-6
        for f, g in itertools.combinations(sorted(self.since), 2):
            _, then = max(self.since[f], self.since[g], key=lambda s: s[0])
            gap = (self.work[f] - then.get(f, 0.0)) - (self.work[g] - then.get(g, 0.0))
            assert abs(gap) <= bound, f"service gap {gap} between {f} and {g} exceeds {bound}"


class BudgetMachine(SchedulerMachine):
    """Any policy under per-agent budgets: never over the token or job limit, refusals exactly
    when over, stops exactly when an agent's room is spent, and no slot idle that a cap allows."""

    budgeted = True

    def build(self, data: st.DataObject) -> Scheduler:
        name = data.draw(st.sampled_from(sorted(POLICIES)), label="policy")
        self.limits = {agent: Limits(
            max_jobs=data.draw(st.sampled_from([None, 1, 2, 3]), label=f"{agent} max_jobs"),
            max_tokens=data.draw(st.sampled_from([None, 8, 20, 40, 80]),
                                 label=f"{agent} max_tokens")) for agent in AGENTS}
        self.rooms: dict[str, int | None] = {}
        options = {"quantum_tokens": 2} if name in ("priority", "las") else {}
        return make_scheduler(name, budget=Budget(limits=self.limits), **options)

    def pending(self, agent: str) -> int:
        return sum(rec.job.prompt_tokens - rec.job.prefilled for rec in self.active.values()
                   if rec.job.agent == agent)

    def room(self, agent: str) -> int | None:
        limit = self.limits[agent].max_tokens
        return None if limit is None else limit - self.service[agent] - self.pending(agent)

    def refusal(self, job: Job) -> str:
        limits = self.limits[job.agent]
        jobs = sum(1 for i in self.live() if self.jobs[i].job.agent == job.agent)
        if limits.max_jobs is not None and jobs >= limits.max_jobs:
            return "too many jobs"
        room = self.room(job.agent)
        if room is not None and job.prompt_tokens + 1 > room:
            return "no token room"
        return ""

    def before_plan(self) -> None:
        self.rooms = {agent: self.room(agent) for agent in AGENTS}

    def forgotten(self, agent: str) -> None:
        """Forgetting an agent drops its usage and the limits set for it: a reused name gets
        the default (no limits here)."""
        super().forgotten(agent)
        self.limits[agent] = Limits()

    def check_plan(self, plan: Plan) -> None:
        stopped = {job.agent for job in plan.stop}
        assert all(self.rooms[agent] == 0 for agent in stopped), "stopped an agent with room"
        live: Counter[str] = Counter(self.jobs[i].job.agent for i in self.live())
        for agent in live:
            assert self.rooms[agent] != 0 or agent in stopped, "spent agent left running"
        batch: Counter[str] = Counter(job.agent for job in plan.run)
        for agent, n in batch.items():
            room = self.rooms[agent]
            assert room is None or n <= room, "more of an agent's jobs than tokens it has left"
        allowed = sum(n if self.rooms[a] is None else min(n, self.rooms[a] or 0)
                      for a, n in live.items() if a not in stopped and a not in self.paused)
        assert len(plan.run) == min(self.capacity, allowed), "left a slot idle"

    @invariant()
    @checked
    def within_budget(self) -> None:
        for agent, limits in getattr(self, "limits", {}).items():
            if limits.max_tokens is not None:
                assert self.service[agent] <= limits.max_tokens
            if limits.max_jobs is not None:
                assert sum(self.jobs[i].job.agent == agent for i in self.live()) <= limits.max_jobs


TestFIFO = FIFOMachine.TestCase
TestRoundRobin = RoundRobinMachine.TestCase
TestPriority = PriorityMachine.TestCase
TestAgentLAS = AgentLASMachine.TestCase
TestFairShare = FairShareMachine.TestCase
TestBudget = BudgetMachine.TestCase
for _case in (TestFIFO, TestRoundRobin, TestPriority, TestAgentLAS, TestFairShare, TestBudget):
    _case.settings = MACHINE
del _case
