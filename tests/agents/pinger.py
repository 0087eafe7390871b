"""A well-behaved agent: calls sys.null on a fixed schedule (every argv[1] ms) and returns its
latency percentiles per phase: a message "next" starts a new phase, "stop" ends the run. Each
latency runs from the call's scheduled start, so a kernel that stalls counts for every call it
delayed, not just once."""

import sys
import time

import sdk

interval = float(sys.argv[1]) / 1000


def figures(latencies: list[float]) -> dict:
    ranked = sorted(latencies) or [0.0]

    def ms(q: float) -> float:
        return round(ranked[min(len(ranked) - 1, int(q * len(ranked)))] * 1000, 2)

    return {"calls": len(latencies), "p50_ms": ms(0.5), "p99_ms": ms(0.99),
            "max_ms": round(ranked[-1] * 1000, 2), "over_50ms": sum(x > 0.05 for x in ranked)}


with sdk.connect(timeout=600) as conn:  # a stalled kernel is measured, not given up on
    for _ in range(50):  # warm up: the first calls set up the rings and fill caches
        conn.sys.null()
    phases: list[list[float]] = [[]]
    print("measuring", flush=True)
    due = time.monotonic()
    while True:
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        conn.sys.null()
        phases[-1].append(time.monotonic() - due)
        due += interval
        if len(phases[-1]) % 5 == 0:
            try:
                if conn.ipc.recv(timeout=0).data == "stop":
                    break
                phases.append([])
            except sdk.TryAgain:
                pass
    conn.proc.exit([figures(p) for p in phases])
