"""One agent of tools/bench/syscall.py: sys.null in a closed loop, then its timings as result.

argv: PATH (ring|zmq) BATCH START_AT SECONDS [MODE]. BATCH 1 times single blocking calls;
BATCH > 1 issues that many calls at once and times the whole batch: MODE `batch` (default) with
the SDK's `conn.batch()` (one doorbell per batch), `async` with asyncio.gather on an
AsyncConnection. Each agent
idles until START_AT (wall clock), so all agents of a run overlap, then loops for SECONDS.
"""

import asyncio
import resource
import sys
import time

import sdk
from sdk import ringpath

MAX_SAMPLES = 20000


def main() -> None:
    path, batch, start_at, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
        float(sys.argv[4])
    if path == "zmq":
        ringpath.disable()
    mode = sys.argv[5] if len(sys.argv) > 5 else "batch"
    if batch == 1:
        result = blocking(start_at, seconds)
    elif mode == "batch":
        result = batched_sync(batch, start_at, seconds)
    else:
        result = asyncio.run(batched(batch, start_at, seconds))
    with sdk.connect() as conn:
        result["path"] = path
        conn.proc.exit(result)


def cpu_ns() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


class Rounds:
    """The timing of one cell: rounds of `per_round` calls until `seconds` have passed."""

    def __init__(self, start_at: float, seconds: float, per_round: int) -> None:
        self.late = time.time() > start_at  # the agent missed the common start
        self.start_at, self.seconds, self.per_round = start_at, seconds, per_round
        self.samples: list[int] = []
        self.calls = 0

    def start(self) -> None:
        """Call after sleeping until `start_at`."""
        self.end = time.perf_counter_ns() + int(self.seconds * 1e9)
        self.cpu = cpu_ns()

    def done(self, t0: int) -> bool:
        """Record a round begun at `t0`; True once the time is up."""
        t1 = time.perf_counter_ns()
        self.calls += self.per_round
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(t1 - t0)
        return t1 >= self.end

    def result(self, rings: bool) -> dict:
        return {"calls": self.calls, "ns": self.samples, "late": self.late, "rings": rings,
                "cpu_ns": cpu_ns() - self.cpu}


def blocking(start_at: float, seconds: float) -> dict:
    with sdk.connect() as conn:
        for _ in range(200):
            conn.sys.null()
        rounds = Rounds(start_at, seconds, 1)
        time.sleep(max(0.0, start_at - time.time()))
        rounds.start()
        while True:
            t0 = time.perf_counter_ns()
            conn.sys.null()
            if rounds.done(t0):
                return rounds.result(conn.uses_rings)


def batched_sync(batch: int, start_at: float, seconds: float) -> dict:
    def one_round() -> None:
        b = conn.batch()
        for _ in range(batch):
            b.sys.null()
        for pending in b.submit():
            pending.result()  # raises if the call failed

    with sdk.connect() as conn:
        for _ in range(20):
            one_round()
        rounds = Rounds(start_at, seconds, batch)
        time.sleep(max(0.0, start_at - time.time()))
        rounds.start()
        while True:
            t0 = time.perf_counter_ns()
            one_round()
            if rounds.done(t0):
                return rounds.result(conn.uses_rings)


async def batched(batch: int, start_at: float, seconds: float) -> dict:
    async with sdk.connect_async() as conn:
        for _ in range(20):
            await asyncio.gather(*(conn.sys.null() for _ in range(batch)))
        rounds = Rounds(start_at, seconds, batch)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        rounds.start()
        while True:
            t0 = time.perf_counter_ns()
            await asyncio.gather(*(conn.sys.null() for _ in range(batch)))
            if rounds.done(t0):
                return rounds.result(conn.uses_rings)


main()
