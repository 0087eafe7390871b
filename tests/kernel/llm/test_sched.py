"""Hand-computed schedules for each kernel.llm.sched policy, budgets, errors and cost."""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys
import time

import pytest

from kernel.llm.sched import (
    POLICIES,
    AgentLAS,
    Budget,
    BudgetExceeded,
    FairShare,
    Job,
    Limits,
    Plan,
    Priority,
    Scheduler,
    make_scheduler,
)
from tests.conftest import ROOT


class Bench:
    """A scheduler driven by a fake engine that prefills a whole prompt in one step."""

    def __init__(self, sched: Scheduler, capacity: int = 1, dt: float = 1.0) -> None:
        self.sched = sched
        self.capacity = capacity
        self.dt = dt
        self.now = 0.0
        self.ids = 0
        self.plans: list[Plan] = []

    def submit(self, agent: str = "a", prompt: int = 0, max_tokens: int = 100,
               priority: int = 0, weight: float = 1.0) -> int:
        job = Job(self.ids, agent, self.now, prompt, max_tokens, priority, weight)
        self.ids += 1
        self.sched.submit(job, self.now)
        return job.id

    def step(self) -> Plan:
        plan = self.sched.schedule(self.now, self.capacity)
        for job in plan.run:
            prefill = job.prompt_tokens - job.prefilled
            self.sched.account(job.id, prefill, 1, self.now)
            if job.generated == job.max_tokens:
                self.sched.finish(job.id, self.now)
        self.plans.append(plan)
        self.now += self.dt
        return plan

    def run(self, steps: int) -> list[list[int]]:
        """The ids in each of the next `steps` batches."""
        return [[job.id for job in self.step().run] for _ in range(steps)]


# -- FIFO ---------------------------------------------------------------------------------------

def test_fifo_runs_in_arrival_order_and_never_preempts() -> None:
    bench = Bench(make_scheduler("fifo"), capacity=2)
    a, b, c = (bench.submit(max_tokens=n) for n in (1, 3, 2))
    assert bench.run(4) == [[a, b], [b, c], [b, c], []]
    assert not any(plan.preempt for plan in bench.plans)


def test_fifo_orders_by_arrival_not_submission() -> None:
    sched = make_scheduler("fifo")
    sched.submit(Job(0, "a", 5.0, 1, 1), 6.0)
    sched.submit(Job(1, "b", 2.0, 1, 1), 6.0)
    assert [job.id for job in sched.schedule(6.0, 1).run] == [1]


def test_fifo_shrinking_capacity_preempts_the_latest_arrival() -> None:
    bench = Bench(make_scheduler("fifo"), capacity=3)
    ids = [bench.submit() for _ in range(3)]
    bench.step()
    bench.capacity = 2
    plan = bench.step()
    assert [job.id for job in plan.run] == ids[:2]
    assert [job.id for job in plan.preempt] == [ids[2]]


# -- round robin --------------------------------------------------------------------------------

def test_round_robin_token_slices() -> None:
    bench = Bench(make_scheduler("rr", slice_tokens=2))
    a, b, c = (bench.submit(max_tokens=3) for _ in range(3))
    assert bench.run(10) == [[a], [a], [b], [b], [c], [c], [a], [b], [c], []]


def test_round_robin_second_slices() -> None:
    bench = Bench(make_scheduler("rr", slice_s=1.0), dt=0.5)
    a, b = bench.submit(), bench.submit()
    assert bench.run(6) == [[a], [a], [b], [b], [a], [a]]


def test_round_robin_runs_on_alone_and_yields_to_a_newcomer() -> None:
    bench = Bench(make_scheduler("rr", slice_tokens=2))
    a = bench.submit()
    assert bench.run(5) == [[a]] * 5
    assert not any(plan.preempt for plan in bench.plans)
    b = bench.submit()
    assert bench.run(3) == [[b], [b], [a]]


@pytest.mark.parametrize(("jobs", "capacity", "slice_tokens"), [(5, 1, 3), (7, 2, 2), (9, 4, 1)])
def test_round_robin_wait_is_at_most_ceil_n_over_c_minus_one_slices(
        jobs: int, capacity: int, slice_tokens: int) -> None:
    bench = Bench(make_scheduler("rr", slice_tokens=slice_tokens), capacity=capacity)
    ids = [bench.submit(max_tokens=1000) for _ in range(jobs)]
    waited = dict.fromkeys(ids, 0)
    longest = 0
    for batch in bench.run(200):
        for i in ids:
            waited[i] = 0 if i in batch else waited[i] + 1
            longest = max(longest, waited[i])
    assert longest == (math.ceil(jobs / capacity) - 1) * slice_tokens


# -- priority -----------------------------------------------------------------------------------

def test_priority_preempts_only_for_higher_priority() -> None:
    bench = Bench(make_scheduler("priority", aging_rate=0.0, quantum_tokens=2))
    low = bench.submit(priority=0, max_tokens=6)
    assert bench.run(3) == [[low]] * 3
    same = bench.submit(priority=0, max_tokens=1)
    assert bench.run(2) == [[low]] * 2  # an equal does not preempt
    high = bench.submit(priority=2, max_tokens=2)
    assert bench.run(2) == [[high]] * 2  # a higher one does, at once: low had its quantum
    assert [job.id for job in bench.plans[5].preempt] == [low]
    assert bench.run(3) == [[same], [low], []]  # same queued before low was preempted


def test_priority_lets_a_running_job_finish_its_quantum() -> None:
    bench = Bench(make_scheduler("priority", aging_rate=0.0, quantum_tokens=2))
    low = bench.submit(priority=0, max_tokens=6)
    bench.step()
    high = bench.submit(priority=2, max_tokens=1)
    assert bench.run(3) == [[low], [high], [low]]


def test_priority_aging_outranks_after_p_plus_one_minus_p_over_rate() -> None:
    bench = Bench(make_scheduler("priority", aging_rate=0.5, quantum_tokens=1))
    high = bench.submit(priority=1, max_tokens=100)
    low = bench.submit(priority=0, max_tokens=1)
    # P = 1: low waits (1 + 1 - 0) / 0.5 = 4 s, then outranks the running high job.
    assert bench.run(6) == [[high], [high], [high], [high], [low], [high]]


def test_priority_aged_job_is_admitted_before_a_fresh_higher_one() -> None:
    sched = Priority(aging_rate=1.0)
    sched.submit(Job(0, "a", 0.0, 1, 1, priority=0), 0.0)
    sched.submit(Job(1, "b", 5.0, 1, 1, priority=3), 5.0)
    assert [job.id for job in sched.schedule(5.0, 1).run] == [0]  # 0 + 5 > 3 + 0


# -- fair share ---------------------------------------------------------------------------------

def test_fair_share_alternates_equal_agents() -> None:
    bench = Bench(make_scheduler("fair"))
    a = [bench.submit("a", prompt=2, max_tokens=1) for _ in range(3)]
    b = [bench.submit("b", prompt=2, max_tokens=1) for _ in range(3)]
    assert bench.run(6) == [[a[0]], [b[0]], [a[1]], [b[1]], [a[2]], [b[2]]]


def test_fair_share_honours_weights() -> None:
    bench = Bench(make_scheduler("fair"))
    a = [bench.submit("a", prompt=2, max_tokens=1) for _ in range(3)]
    b = [bench.submit("b", prompt=2, max_tokens=1, weight=2.0) for _ in range(6)]
    assert bench.run(9) == [[a[0]], [b[0]], [b[1]], [a[1]], [b[2]], [b[3]], [a[2]], [b[4]],
                            [b[5]]]


def test_fair_share_charges_prompt_on_admission_and_output_as_generated() -> None:
    sched = FairShare(input_weight=1.0, output_weight=2.0)
    sched.submit(Job(0, "a", 0.0, 10, 5, weight=2.0), 0.0)
    sched.schedule(0.0, 1)
    assert sched.counter("a") == 5.0
    sched.account(0, 10, 1, 0.0)
    assert sched.counter("a") == 6.0


def test_fair_share_lifts_an_idle_agent_so_idling_is_not_banked() -> None:
    bench = Bench(make_scheduler("fair"))
    for _ in range(10):
        bench.submit("a", prompt=2, max_tokens=1)
    bench.run(5)
    b = [bench.submit("b", prompt=2, max_tokens=1) for _ in range(5)]
    batches = bench.run(6)
    assert sum(batch[0] in b for batch in batches) == 3  # alternates, not b five times over


def test_fair_share_does_not_bank_a_paused_agents_waiting_time() -> None:
    """A paused agent is out of the race like an idle one: on resume it is lifted to the
    lowest counter still racing, not let to catch up on everything served meanwhile."""
    bench = Bench(make_scheduler("fair"))
    a = [bench.submit("a", prompt=2, max_tokens=1) for _ in range(10)]
    b = [bench.submit("b", prompt=2, max_tokens=1) for _ in range(10)]
    bench.sched.paused.add("a")
    assert all(batch[0] in b for batch in bench.run(5))
    bench.sched.paused.discard("a")
    c = [bench.submit("c", prompt=2, max_tokens=1) for _ in range(5)]
    batches = bench.run(9)
    served = [sum(batch[0] in jobs for batch in batches) for jobs in (a, b, c)]
    assert served == [3, 3, 3]  # round the three, not a five times over


def test_fair_share_lifts_to_the_last_counter_when_nobody_is_backlogged() -> None:
    sched = FairShare()
    sched.submit(Job(0, "a", 0.0, 4, 1), 0.0)
    sched.schedule(0.0, 1)  # a leaves the backlog at counter 4
    sched.account(0, 4, 1, 0.0)
    sched.finish(0, 0.0)
    sched.submit(Job(1, "b", 1.0, 4, 1), 1.0)
    assert sched.counter("b") == 4.0


# -- agent-level least attained service ---------------------------------------------------------

def test_las_serves_the_agent_with_least_service_first() -> None:
    bench = Bench(AgentLAS(thresholds=(10,), quantum_tokens=1), capacity=1)
    bench.submit("a", prompt=20, max_tokens=1)
    bench.run(1)  # a has attained 21 tokens: level 1, and it is remembered after the job ends
    a, b = bench.submit("a", max_tokens=1), bench.submit("b", max_tokens=1)
    assert bench.run(2) == [[b], [a]]


def test_las_equal_levels_do_not_preempt_and_lower_levels_do() -> None:
    bench = Bench(AgentLAS(thresholds=(5,), quantum_tokens=1))
    a = bench.submit("a", max_tokens=8)
    bench.run(2)
    b = bench.submit("b", max_tokens=1)  # both level 0: b waits
    assert bench.run(3) == [[a], [a], [a]]
    assert bench.run(1) == [[b]]  # a reached 5 tokens, level 1: b preempts it
    assert bench.run(4) == [[a], [a], [a], []]


def test_las_promotes_a_starving_job() -> None:
    bench = Bench(AgentLAS(thresholds=(2,), starvation_s=3.0, quantum_tokens=1))
    old = bench.submit("old", prompt=5, max_tokens=1)
    bench.run(1)
    starving = bench.submit("old", max_tokens=1)
    for _ in range(4):
        bench.submit("new", max_tokens=1)  # a fresh agent at level 0 ... until it is not
        bench.submit(f"fresh{bench.ids}", max_tokens=2)
    batches = bench.run(4)
    assert not any(old in batch for batch in batches)
    assert [starving] not in batches[:3] and batches[3] == [starving]  # waited 3 s


def test_las_forget_agent_resets_service() -> None:
    sched = AgentLAS(thresholds=(2,))
    sched.submit(Job(0, "a", 0.0, 5, 1), 0.0)
    sched.schedule(0.0, 1)
    sched.account(0, 5, 1, 0.0)
    sched.finish(0, 0.0)
    assert sched.level("a") == 1
    sched.forget_agent("a")
    assert sched.level("a") == 0


# -- budgets ------------------------------------------------------------------------------------

def test_budget_limits_jobs_in_flight() -> None:
    sched = make_scheduler("fifo", budget=Budget(Limits(max_jobs=2)))
    sched.submit(Job(0, "a", 0.0, 1, 1), 0.0)
    sched.submit(Job(1, "a", 0.0, 1, 1), 0.0)
    with pytest.raises(BudgetExceeded, match="limit 2"):
        sched.submit(Job(2, "a", 0.0, 1, 1), 0.0)
    sched.submit(Job(3, "b", 0.0, 1, 1), 0.0)
    sched.finish(0, 0.0)
    sched.submit(Job(2, "a", 0.0, 1, 1), 0.0)


def test_budget_refuses_a_prompt_that_leaves_no_room_to_generate() -> None:
    sched = make_scheduler("fifo", budget=Budget(limits={"a": Limits(max_tokens=10)}))
    with pytest.raises(BudgetExceeded) as refused:
        sched.submit(Job(0, "a", 0.0, 10, 5), 0.0)
    assert "10 tokens of budget left" in refused.value.reason
    sched.submit(Job(1, "a", 0.0, 9, 5), 0.0)
    with pytest.raises(BudgetExceeded):
        sched.submit(Job(2, "a", 0.0, 1, 5), 0.0)  # job 1's 9 are committed: 1 left


def test_budget_stops_an_agent_mid_generation() -> None:
    budget = Budget(Limits(max_tokens=10))
    bench = Bench(make_scheduler("rr", budget=budget), capacity=2)
    a, b = bench.submit("a", prompt=4), bench.submit("b", prompt=1, max_tokens=3)
    batches = bench.run(7)
    assert batches == [[a, b]] * 3 + [[a]] * 3 + [[]]
    assert [job.id for job in bench.plans[6].stop] == [a]
    assert budget.used("a") == 10 and budget.jobs("a") == 0
    assert bench.sched.waiting() == bench.sched.running() == []


def test_budget_caps_an_agent_to_its_room_in_a_batch() -> None:
    budget = Budget(Limits(max_tokens=7))
    bench = Bench(make_scheduler("fair", budget=budget), capacity=4)
    a0, _ = bench.submit("a", prompt=3), bench.submit("a", prompt=3)
    assert budget.room("a") == 1
    assert bench.run(1) == [[a0]]  # one token of room: one job in the batch
    plan = bench.step()
    assert plan.run == [] and len(plan.stop) == 2
    assert budget.used("a") == 4


def test_limits_and_budget_validate() -> None:
    with pytest.raises(ValueError):
        Limits(max_jobs=0)
    budget = Budget()
    sched = make_scheduler("fifo", budget=budget)
    sched.submit(Job(0, "a", 0.0, 1, 1), 0.0)
    with pytest.raises(ValueError, match="still has jobs"):
        sched.forget_agent("a")


# -- interface errors ---------------------------------------------------------------------------

def test_make_scheduler_rejects_unknown_names_and_options() -> None:
    assert set(POLICIES) == {"fifo", "rr", "priority", "fair", "las"}
    with pytest.raises(ValueError, match="unknown scheduler 'lottery'"):
        make_scheduler("lottery")
    with pytest.raises(ValueError, match=r"no option 'slice'.*slice_tokens, slice_s"):
        make_scheduler("rr", slice=3)
    with pytest.raises(ValueError, match="not both"):
        make_scheduler("rr", slice_tokens=3, slice_s=1.0)
    with pytest.raises(ValueError, match="increasing"):
        make_scheduler("las", thresholds=(10, 5))
    with pytest.raises(ValueError):
        make_scheduler("priority", quantum_tokens=0)


def test_jobs_and_calls_are_validated() -> None:
    with pytest.raises(ValueError):
        Job(0, "a", 0.0, 1, 0)
    with pytest.raises(ValueError):
        Job(0, "a", 0.0, 1, 1, weight=0.0)
    sched = make_scheduler("fifo")
    sched.submit(Job(0, "a", 0.0, 3, 2), 0.0)
    with pytest.raises(ValueError, match="already submitted"):
        sched.submit(Job(0, "a", 0.0, 3, 2), 0.0)
    with pytest.raises(KeyError):
        sched.account(0, 1, 0, 0.0)  # still waiting
    sched.schedule(0.0, 1)
    with pytest.raises(ValueError, match="max_tokens"):
        sched.account(0, 3, 3, 0.0)  # a step may give several tokens, not past max_tokens
    with pytest.raises(ValueError, match="max_tokens"):
        sched.account(0, 3, -1, 0.0)
    with pytest.raises(ValueError, match="prompt"):
        sched.account(0, 4, 0, 0.0)
    with pytest.raises(ValueError, match="before its prompt"):
        sched.account(0, 2, 1, 0.0)
    with pytest.raises(ValueError, match="backwards"):
        sched.schedule(-1.0, 1)
    with pytest.raises(KeyError):
        sched.finish(7, 0.0)


def test_scheduler_imports_no_heavy_modules() -> None:
    probe = ("import sys, kernel.llm.sched; print(sorted(m for m in sys.modules"
             " if m.split('.')[0] in ('torch', 'transformers', 'zmq')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# -- cost ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(POLICIES))
def test_schedule_is_cheap_with_a_thousand_jobs(name: str) -> None:
    """1000 jobs in flight, a batch of 32: the median schedule() stays far under a millisecond
    (about 0.01 ms measured here); the limit is loose so a busy machine does not fail it."""
    rng = random.Random(7)
    bench = Bench(make_scheduler(name), capacity=32, dt=0.05)
    for _ in range(1000):
        bench.submit(f"agent:{rng.randrange(100)}", rng.randrange(1, 64), rng.randrange(1, 64),
                     rng.randrange(4))
    costs = []
    for _ in range(200):
        start = time.perf_counter()
        plan = bench.sched.schedule(bench.now, bench.capacity)
        costs.append(time.perf_counter() - start)
        for job in plan.run:
            bench.sched.account(job.id, job.prompt_tokens - job.prefilled, 1, bench.now)
            if job.generated == job.max_tokens:
                bench.sched.finish(job.id, bench.now)
                bench.submit(job.agent, job.prompt_tokens, job.max_tokens, job.priority)
        bench.now += bench.dt
    assert statistics.median(costs) < 1e-3
