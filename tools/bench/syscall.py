"""Null-syscall round trips through a real kernel: the shared-memory ring path vs ZeroMQ only.

Boots a kernel in a temporary state dir and, for 1 and 16 agent processes (spawned by the
kernel, so each has its rings), runs `sys.null` in a closed loop for a few seconds per cell:
unbatched (one blocking call at a time: latency) and batched (BATCH calls submitted together
with `conn.batch()`, one doorbell per batch on the ring path, or with `--mode async` as
asyncio.gather on an AsyncConnection: throughput). The ZeroMQ-only
cells use the same kernel and agents, which just leave their rings unclaimed. Besides wall
latencies it reports CPU time per call, in the kernel and in the agents (from /proc and
getrusage): on a machine shared with other work, the wall figures measure the scheduler as
much as the path, the CPU figures do not. Last line:
`RESULT ring_p50_us=A zmq_p50_us=B ring_speedup=B/A batched_ops_per_s=C` (p50s of single
calls from 1 agent; C the best aggregate batched rate over the ring).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernelproc import boot_kernel  # noqa: E402

import sdk  # noqa: E402

AGENT = Path(__file__).resolve().parent / "syscall_agent.py"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def cpu_ns(pid: int) -> int:
    """utime + stime of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def cell(conn: sdk.Connection, kernel_pid: int, path: str, agents: int, batch: int,
         seconds: float, mode: str) -> dict:
    start_at = time.time() + 1.5 + 0.35 * agents  # time for every agent to start and warm up
    ids = [conn.proc.spawn(str(AGENT), argv=[path, str(batch), str(start_at), str(seconds),
                                             mode],
                           name=f"bench-{path}-{batch}-{i}") for i in range(agents)]
    time.sleep(max(0.0, start_at - time.time()))
    kernel_cpu = cpu_ns(kernel_pid)
    time.sleep(seconds)
    kernel_cpu = cpu_ns(kernel_pid) - kernel_cpu
    results = []
    for agent_id in ids:
        info = conn.proc.wait(agent_id, timeout=120)
        if info.exit_status != 0 or not isinstance(info.result, dict):
            out = conn.proc.logs(agent_id, stream="stderr").data.decode(errors="replace")
            raise RuntimeError(f"bench agent {agent_id} failed ({info.state}, status "
                               f"{info.exit_status}):\n{out}")
        results.append(info.result)
    assert all(r["rings"] == (path == "ring") for r in results), "agent took the wrong path"
    per_call_us = [ns / batch / 1000 for r in results for ns in r["ns"]]
    round_us = [ns / 1000 for r in results for ns in r["ns"]]
    calls = sum(r["calls"] for r in results)
    return {"path": path, "agents": agents, "batch": batch,
            "p50": pct(round_us, 50), "p99": pct(round_us, 99),
            "per_call": statistics.median(per_call_us),
            "ops": calls / seconds,
            "kernel_cpu": kernel_cpu / 1000 / calls,
            "agent_cpu": sum(r["cpu_ns"] for r in results) / 1000 / calls,
            "late": sum(r["late"] for r in results)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", default="1,16")
    p.add_argument("--batch", type=int, default=64, help="calls per batch in batched cells")
    p.add_argument("--seconds", type=float, default=2.0, help="measured time per cell")
    p.add_argument("--mode", choices=("batch", "async"), default="batch",
                   help="how batched cells issue their calls")
    args = p.parse_args()
    counts = [int(x) for x in args.agents.split(",")]
    state = Path(tempfile.mkdtemp(prefix="agentos-bench.")) / "state"
    kernel = boot_kernel(state, "--log-level", "warning")
    rows = []
    try:
        with sdk.connect(state_dir=state, timeout=60) as conn:
            kernel_pid = conn.sys.stats().pid
            for agents in counts:
                for batch in (1, args.batch):
                    for path in ("ring", "zmq"):
                        rows.append(cell(conn, kernel_pid, path, agents, batch, args.seconds,
                                         args.mode))
                        print(f"  {path:<4} agents={agents:<3} batch={batch:<3} done", flush=True,
                              file=sys.stderr)
    finally:
        kernel.terminate()
        kernel.wait(30)
    print(f"\nsys.null round trips, {args.seconds:.0f} s per cell; a batched round is {args.batch} "
          f"calls in flight at once ({args.mode})")
    print(f"  {'path':<5} {'agents':>6} {'batch':>5} {'p50 round':>10} {'p99 round':>10} "
          f"{'per call':>9} {'syscalls/s':>11} {'kernel CPU':>10} {'agent CPU':>9}")
    for r in rows:
        print(f"  {r['path']:<5} {r['agents']:>6} {r['batch']:>5} {r['p50']:>8.1f}µs "
              f"{r['p99']:>8.1f}µs {r['per_call']:>7.2f}µs {r['ops']:>11,.0f} "
              f"{r['kernel_cpu']:>8.2f}µs {r['agent_cpu']:>7.2f}µs"
              + (f"  ({r['late']} agents started late)" if r["late"] else ""))

    def find(path: str, agents: int, batch: int) -> dict:
        return next(r for r in rows
                    if (r["path"], r["agents"], r["batch"]) == (path, agents, batch))

    ring_p50 = find("ring", counts[0], 1)["p50"]
    zmq_p50 = find("zmq", counts[0], 1)["p50"]
    batched = max(r["ops"] for r in rows if r["path"] == "ring" and r["batch"] > 1)
    print(f"RESULT ring_p50_us={ring_p50:.1f} zmq_p50_us={zmq_p50:.1f} "
          f"ring_speedup={zmq_p50 / ring_p50:.2f} batched_ops_per_s={batched:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
