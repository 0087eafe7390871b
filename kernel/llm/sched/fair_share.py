"""Fair share by Virtual Token Counters (VTC, Sheng et al., OSDI'24)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from kernel.llm.sched.budget import Budget
from kernel.llm.sched.job import Job
from kernel.llm.sched.runqueue import RunQueue
from kernel.llm.sched.scheduler import Scheduler, Slots


class FairShare(Scheduler):
    """Each agent has a counter of weighted service: a job's prompt costs
    input_weight * prompt_tokens / weight, charged when the job is first admitted, and each
    generated token output_weight / weight. Every free slot goes to the earliest job of the
    backlogged agent (one with a waiting job) whose counter is lowest. An agent that becomes
    backlogged has its counter lifted to the lowest backlogged counter (or, with none, to the
    last one's), so time spent idle is not banked. A paused agent (`paused`) is out of the
    race as an idle one is: its counter does not hold the others' lift down, and on resume it is
    lifted like a newcomer, so time spent paused is not banked either. Running jobs are not
    preempted, as in VTC.

    Bound (c the capacity; P and R the largest prompt and output costs of any job,
    P = input_weight * prompt_tokens / weight, R = output_weight * max_tokens / weight): the
    counters of any two backlogged unpaused agents differ by at most U = P + c*R, so over any
    interval in which both stay backlogged the service they get differs by at most 2U.

    Proof sketch. Let V be the lowest backlogged counter (it never falls: counters only grow,
    and a newcomer is lifted to at least V) and C_a = counter + the output cost a's running jobs
    may still incur. Serving moves cost from the second term to the first, and finishing or
    preempting only lowers C_a; so C_a grows only when a is admitted a job, at counter = V
    (a is the lowest), to at most V + P + c*R, or is lifted, to at most V + c*R. Hence
    C_a <= V + U always, and every backlogged counter lies in [V, V + U]. The bound holds while
    budgets do not cap an agent out of its turn.
    """

    def __init__(self, *, input_weight: float = 1.0, output_weight: float = 2.0,
                 budget: Budget | None = None) -> None:
        super().__init__(budget=budget)
        if not (input_weight >= 0 and output_weight >= 0):
            raise ValueError("input_weight and output_weight must be >= 0")
        self.input_weight = input_weight
        self.output_weight = output_weight
        self._counter: dict[str, float] = {}
        self._backlog: dict[str, RunQueue] = {}  # backlogged agents -> their waiting jobs
        self._floor = 0.0  # the last racing counter, for when nobody is racing
        self._away: set[str] = set()  # backlogged agents that were paused at the last step

    def counter(self, agent: str) -> float:
        return self._counter.get(agent, 0.0)

    def _racing(self) -> list[str]:
        """Backlogged agents that may be served: those not paused, nor just back from a pause."""
        return [a for a in self._backlog if a not in self.paused and a not in self._away]

    def _lift(self, agent: str) -> None:
        floor = min((self._counter[a] for a in self._racing() if a != agent),
                    default=self._floor)
        self._counter[agent] = max(self.counter(agent), floor)

    def _enqueue(self, job: Job) -> None:
        queue = self._backlog.get(job.agent)
        if queue is None:
            self._lift(job.agent)
            queue = self._backlog[job.agent] = RunQueue(key=lambda j: (j.arrival,))
        queue.add(job)

    def _dequeue(self, job: Job) -> None:
        queue = self._backlog[job.agent]
        queue.remove(job)
        if not queue:
            del self._backlog[job.agent]
            self._away.discard(job.agent)
            if job.agent not in self.paused and not self._racing():
                self._floor = self._counter[job.agent]

    def _served(self, job: Job, prefill: int, decode: int) -> None:
        self._counter[job.agent] = self.counter(job.agent) + (
            self.output_weight * decode / job.weight)

    def _forget(self, agent: str) -> None:
        self._counter.pop(agent, None)
        self._away.discard(agent)

    def _accounted(self) -> set[str]:
        return set(self._counter)

    def _select(self, now: float, slots: Slots) -> tuple[list[Job], list[Job]]:
        back = [a for a in self._away if a not in self.paused]
        if back:  # resumed: lifted to the agents that kept racing meanwhile
            floor = min((self._counter[a] for a in self._racing()), default=self._floor)
            for agent in back:
                self._counter[agent] = max(self._counter[agent], floor)
            self._away.difference_update(back)
        self._away.update(a for a in self._backlog if a in self.paused)
        run = list(self._running.values())
        preempt: list[Job] = []
        if not slots.fill(run):  # capacity or a budget cap shrank: the agents served most yield
            ranked, run = sorted(run, key=lambda j: (self.counter(j.agent), j.arrival, j.id)), []
            for job in ranked:
                (run if slots.take(job) else preempt).append(job)
        if slots.free <= 0 or not self._backlog:
            return run, preempt
        turns = [(self._counter[agent], agent) for agent in self._backlog]
        heapq.heapify(turns)
        queues: dict[str, Iterator[Job]] = {}
        while turns and slots.free > 0:
            _, agent = heapq.heappop(turns)
            job = next(queues.setdefault(agent, iter(self._backlog[agent])), None)
            if job is None or not slots.take(job):
                continue  # nothing more waiting, or capped by its budget: out for this step
            if job.first_run is None:
                self._counter[agent] += self.input_weight * job.prompt_tokens / job.weight
            run.append(job)
            heapq.heappush(turns, (self._counter[agent], agent))
        return run, preempt
