"""Tool-call overhead and throughput through the kernel, with persistent sandboxed tool processes.

(1) Overhead: one agent makes calculator calls one after another; overhead = the agent's round
trip minus the tool's own time (measured inside the tool process), so it is what the kernel,
the ABI, the sandboxed process hop and the SDK add. A `sys.null` round trip is shown beside it.
(2) Throughput: 16 agents make read-only calculator calls concurrently (the calculator's
concurrency limit is 8 tool processes); calls per second over the makespan.
The last line is `RESULT overhead_p50_ms=... calls_per_s=...`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernelproc import boot_kernel  # noqa: E402

import sdk  # noqa: E402

AGENT = str(ROOT / "tools/bench/tools_agent.py")
CAPS = ["tools.call@tool/calculator"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def agents(conn: sdk.Connection, n: int, calls: int) -> tuple[list[dict], float]:
    ids = [conn.proc.spawn(AGENT, name=f"tb{i}", argv=[str(calls)], caps=CAPS)
           for i in range(n)]
    deadline = time.time() + 120
    while time.time() < deadline and any(conn.proc.info(a).state == "starting" for a in ids):
        time.sleep(0.05)
    time.sleep(1.0 + 0.1 * n)  # every agent past its warm-up and waiting in recv
    start = time.perf_counter()
    for i in range(n):
        conn.ipc.send(f"tb{i}", "go")
    infos = [conn.proc.wait(a) for a in ids]
    makespan = time.perf_counter() - start
    for i, info in enumerate(infos):
        if info.exit_status != 0:
            err = conn.proc.logs(ids[i], stream="stderr").data.decode()
            raise RuntimeError(f"bench agent {i} failed: {err[-2000:]}")
    return [info.result for info in infos], makespan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=500, help="sequential calls for the overhead")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--per-agent", type=int, default=100, help="calls per agent for throughput")
    args = p.parse_args()
    state = Path(tempfile.mkdtemp(prefix="agentos-toolbench.")) / "state"
    kernel = boot_kernel(state, attempts=300)
    try:
        with sdk.connect(state_dir=state, timeout=600) as conn:
            null = []
            for _ in range(300):
                t0 = time.perf_counter()
                conn.sys.null()
                null.append((time.perf_counter() - t0) * 1000)
            (one,), _ = agents(conn, 1, args.calls)
            many, makespan = agents(conn, args.agents, args.per_agent)
    finally:
        kernel.terminate()
        kernel.wait(30)
    overhead = [r - t for r, t in zip(one["rtt_ms"], one["tool_ms"], strict=True)]
    total = sum(len(r["rtt_ms"]) for r in many)
    rate = total / makespan
    many_rtt = [x for r in many for x in r["rtt_ms"]]
    print("tool-call overhead (1 agent, sequential calculator calls, persistent tool process)")
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for label, values in (("sys.null round trip", null), ("tool round trip", one["rtt_ms"]),
                          ("tool's own time", one["tool_ms"]), ("overhead", overhead)):
        print(f"{label:<24}{pct(values, 0.5):>10.3f}{pct(values, 0.99):>10.3f}"
              f"{statistics.mean(values):>10.3f}")
    print(f"\nthroughput: {args.agents} agents x {args.per_agent} read-only calls: {total} calls "
          f"in {makespan:.2f} s = {rate:.0f} calls/s; per-call p50 {pct(many_rtt, 0.5):.2f} ms, "
          f"p99 {pct(many_rtt, 0.99):.2f} ms")
    print(f"RESULT overhead_p50_ms={pct(overhead, 0.5):.2f} calls_per_s={rate:.0f} "
          f"overhead_p99_ms={pct(overhead, 0.99):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
