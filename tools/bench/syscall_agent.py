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


def blocking(start_at: float, seconds: float) -> dict:
    with sdk.connect() as conn:
        for _ in range(200):
            conn.sys.null()
        late = time.time() > start_at
        time.sleep(max(0.0, start_at - time.time()))
        samples: list[int] = []
        clock = time.perf_counter_ns
        end = clock() + int(seconds * 1e9)
        cpu = cpu_ns()
        n = 0
        while True:
            t0 = clock()
            conn.sys.null()
            t1 = clock()
            n += 1
            if len(samples) < MAX_SAMPLES:
                samples.append(t1 - t0)
            if t1 >= end:
                break
        return {"calls": n, "ns": samples, "late": late, "rings": conn.uses_rings,
                "cpu_ns": cpu_ns() - cpu}


def batched_sync(batch: int, start_at: float, seconds: float) -> dict:
    with sdk.connect() as conn:
        for _ in range(20):
            with conn.batch() as b:
                for _ in range(batch):
                    b.sys.null()
        late = time.time() > start_at
        time.sleep(max(0.0, start_at - time.time()))
        samples: list[int] = []
        clock = time.perf_counter_ns
        end = clock() + int(seconds * 1e9)
        cpu = cpu_ns()
        n = 0
        while True:
            t0 = clock()
            b = conn.batch()
            for _ in range(batch):
                b.sys.null()
            for pending in b.submit():
                pending.result()  # raises if the call failed
            t1 = clock()
            n += batch
            if len(samples) < MAX_SAMPLES:
                samples.append(t1 - t0)
            if t1 >= end:
                break
        return {"calls": n, "ns": samples, "late": late, "rings": conn.uses_rings,
                "cpu_ns": cpu_ns() - cpu}


async def batched(batch: int, start_at: float, seconds: float) -> dict:
    async with sdk.connect_async() as conn:
        for _ in range(20):
            await asyncio.gather(*(conn.sys.null() for _ in range(batch)))
        late = time.time() > start_at
        await asyncio.sleep(max(0.0, start_at - time.time()))
        samples: list[int] = []
        clock = time.perf_counter_ns
        end = clock() + int(seconds * 1e9)
        cpu = cpu_ns()
        n = 0
        while True:
            t0 = clock()
            await asyncio.gather(*(conn.sys.null() for _ in range(batch)))
            t1 = clock()
            n += batch
            if len(samples) < MAX_SAMPLES:
                samples.append(t1 - t0)
            if t1 >= end:
                break
        return {"calls": n, "ns": samples, "late": late, "rings": conn.uses_rings,
                "cpu_ns": cpu_ns() - cpu}


main()
