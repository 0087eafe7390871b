"""Agent scale benchmark: spawn time per sandbox tier, memory per idle agent, how many idle
sandboxed agents one kernel holds while still answering sys.null quickly.

    .venv/bin/python tools/bench/agents_scale.py [--spawns 30] [--max 300] [--step 25]
                                                 [--zygote on|off] [--tiers strict]

Boots a kernel in a fresh state dir. For each tier this machine applies (none, standard,
strict) it spawns `--spawns` idle agents one after another, timing the `proc.spawn` call (the
kernel prepares the home and endpoint, starts the launcher, which applies every layer and execs
the agent) and the time until the agent's own first syscall. Then it keeps adding idle agents of
the strongest tier in steps up to `--max`, measuring sys.null p99 from an admin connection
after each step; `max_agents` is the largest count still under 5 ms. RSS is the agent's
processes (its uid), summed; the strict tier's two bwrap processes are reported apart. RSS
counts every page the agent maps, shared or not; what an agent really costs the machine is its
USS (pages no other process maps) and PSS (shared pages divided among their sharers), from
/proc/PID/smaps_rollup: with the zygote (kernel/proc/zygote.py, `--zygote on`, the default) most
of an agent's interpreter is the template's pages, shared copy-on-write. Last line:
`RESULT spawn_p50_ms=… uss_mb=… pss_mb=… rss_mb=… max_agents=…`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernelproc import boot_kernel, serving  # noqa: E402

import sdk  # noqa: E402
from kernel.proc import sandbox  # noqa: E402

IDLE = str(Path(__file__).resolve().parent / "idle_agent.py")
P99_LIMIT_MS = 5.0


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rollup_kb(pid: int) -> tuple[int, int]:
    """(USS, PSS) in kB of one process, from smaps_rollup (USS = private clean + dirty)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return 0, 0
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0), fields.get("Pss", 0)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def nofile(pid: int) -> int:
    """The hard RLIMIT_NOFILE of `pid` (what the kernel lifts its soft limit to)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[4])
    return 0


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (real uid, parent pid) of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                found[int(entry)] = (int(fields["Uid"].split()[0]), int(fields["PPid"]))
            except (OSError, KeyError, ValueError):
                continue
    return found


def null_latency(conn: sdk.Connection, n: int = 1000, tries: int = 3) -> tuple[float, float]:
    """(p50, p99) in ms of `n` sys.null calls, the best of `tries` runs: on a shared machine a
    burst from another tenant should not decide the result."""
    best = (float("inf"), float("inf"))
    for _ in range(tries):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.sys.null()
            times.append((time.perf_counter() - t0) * 1000)
        best = min(best, (pct(times, 50), pct(times, 99)), key=lambda r: r[1])
        if best[1] < P99_LIMIT_MS:
            break
    return best


def wait_ready(conn: sdk.Connection, agent_id: int, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.proc.logs(agent_id).data.startswith(b"ready"):
            return time.monotonic()
        time.sleep(0.002)
    raise RuntimeError(f"agent {agent_id} not ready: {conn.proc.logs(agent_id, 'stderr').data}")


def spawn_series(conn: sdk.Connection, tier: str, n: int) -> tuple[list[float], list[float],
                                                                  list[int]]:
    spawn_ms, ready_ms, ids = [], [], []
    for _ in range(n):
        start = time.monotonic()
        agent_id = conn.proc.spawn(IDLE, sandbox=tier, name=f"{tier}-{len(ids)}")
        spawn_ms.append((time.monotonic() - start) * 1000)
        ready_ms.append((wait_ready(conn, agent_id) - start) * 1000)
        ids.append(agent_id)
    return spawn_ms, ready_ms, ids


def agent_rss(conn: sdk.Connection, ids: list[int]) -> tuple[float, float, float, float]:
    """Per agent, in MB: RSS of its own processes, RSS of launcher processes around them (the
    strict tier's bwrap), and the USS and PSS of its own processes plus those launchers."""
    procs = processes()
    own = around = uss = pss = 0
    for agent_id in ids:
        info = conn.proc.info(agent_id)
        if info.uid is not None:
            mine = [p for p, (uid, _) in procs.items() if uid == info.uid]
            own += sum(rss_kb(p) for p in mine)
            for p in mine:
                u, s = rollup_kb(p)
                uss, pss = uss + u, pss + s
            # bwrap's monitor and init (root) sit between the kernel and the agent.
            chain, p = [], procs.get(mine[0], (0, 0))[1] if mine else 0
            while p and p in procs and procs[p][0] == 0 and len(chain) < 2:
                chain.append(p)
                p = procs[p][1]
            if info.sandbox == "strict" and "zygote" not in info.layers:
                around += sum(rss_kb(c) for c in chain)
                for c in chain:
                    u, s = rollup_kb(c)
                    uss, pss = uss + u, pss + s
        else:
            own += rss_kb(info.pid)
            u, s = rollup_kb(info.pid)
            uss, pss = uss + u, pss + s
    n = len(ids) * 1024
    return own / n, around / n, uss / n, pss / n


def kill_all(conn: sdk.Connection, ids: list[int]) -> None:
    for agent_id in ids:
        conn.proc.kill(agent_id, grace=0)
    for agent_id in ids:
        conn.proc.wait(agent_id, timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spawns", type=int, default=30, help="spawns timed per tier")
    p.add_argument("--max", type=int, default=300, help="stop adding agents here")
    p.add_argument("--step", type=int, default=25, help="agents added between measurements")
    p.add_argument("--zygote", choices=("on", "off"), default="on",
                   help="start agents from the zygote (kernel config `zygote`), or exec each")
    p.add_argument("--tiers", default="none,standard,strict",
                   help="the tiers whose spawns are timed (comma-separated)")
    p.add_argument("--stop-early", action="store_true",
                   help="stop at the first step over 5 ms (by default it fills to --max and "
                        "reports the largest count under 5 ms: on a shared machine one noisy "
                        "step should not end the run)")
    args = p.parse_args()

    probe = sandbox.probe()
    tiers = []
    for tier in args.tiers.split(","):
        try:
            sandbox.plan(tier, probe)
            tiers.append(tier)
        except sandbox.SandboxUnavailable as exc:
            print(f"skipping tier {tier}: {exc}", file=sys.stderr)
    best = tiers[-1]
    base = Path(tempfile.mkdtemp(prefix="agentos-scale-"))
    base.chmod(0o711)  # agents of their own uids pass through to their homes
    state = base / "state"
    config = base / "kernel.toml"
    config.write_text(f"[kernel]\nzygote = {'true' if args.zygote == 'on' else 'false'}\n")
    kernel = boot_kernel(state, "--log-level", "warning", "--sandbox", best, "--config",
                         str(config), attempts=300)
    try:
        with serving(kernel, base / "kernel.log"):
            results: dict[str, dict[str, float]] = {}
            with sdk.connect(state_dir=state, timeout=60) as conn:
                print(f"{'tier':<9} {'spawn p50':>10} {'spawn p99':>10} {'ready p50':>10} "
                      f"{'ready p99':>10} {'RSS/agent':>10} {'+bwrap':>8} {'USS':>8} {'PSS':>8}")
                for tier in tiers:
                    try:
                        spawn_ms, ready_ms, ids = spawn_series(conn, tier, args.spawns)
                    except sdk.PermissionDenied as exc:  # an interpreter agent uids cannot reach
                        print(f"{tier:<9} cannot start agents here: {exc}", flush=True)
                        for agent_id in [a.id for a in conn.proc.ps() if a.state == "running"]:
                            conn.proc.kill(agent_id, grace=0)
                        continue
                    time.sleep(0.5)  # let the agents settle into their idle wait
                    rss, around, uss, pss = agent_rss(conn, ids)
                    kill_all(conn, ids)
                    results[tier] = {"p50": pct(spawn_ms, 50), "p99": pct(spawn_ms, 99),
                                     "rss": rss, "uss": uss, "pss": pss}
                    print(f"{tier:<9} {pct(spawn_ms, 50):>8.1f}ms {pct(spawn_ms, 99):>8.1f}ms "
                          f"{pct(ready_ms, 50):>8.1f}ms {pct(ready_ms, 99):>8.1f}ms "
                          f"{rss:>8.1f}MB {around:>6.1f}MB {uss:>6.1f}MB {pss:>6.1f}MB", flush=True)

                print(f"\nidle {best} agents   sys.null p50/p99 (admin connection, best of 3)")
                p50, p99 = null_latency(conn)
                print(f"{0:>5}          {p50:.2f} / {p99:.2f} ms", flush=True)
                running: list[int] = []
                held = 0
                fds_before = fd_count(kernel.pid)
                start = time.monotonic()
                while len(running) < args.max:
                    for _ in range(min(args.step, args.max - len(running))):
                        agent_id = conn.proc.spawn(IDLE, sandbox=best, name=f"idle-{len(running)}")
                        running.append(agent_id)
                    for agent_id in running[-args.step:]:
                        wait_ready(conn, agent_id)
                    time.sleep(0.2)
                    p50, p99 = null_latency(conn)
                    print(f"{len(running):>5}          {p50:.2f} / {p99:.2f} ms", flush=True)
                    if p99 < P99_LIMIT_MS:
                        held = len(running)
                    elif args.stop_early:
                        break
                fill_s = time.monotonic() - start
                free = shutil.disk_usage(state).free
                per_agent = (fd_count(kernel.pid) - fds_before) / max(1, len(running))
                limit = nofile(kernel.pid)
                print(f"\nkernel fds: {per_agent:.1f} per idle agent (pidfd, log pipes, "
                      f"endpoint listener and connection, rings, door and egress listeners); "
                      f"RLIMIT_NOFILE {limit} caps the kernel at ~{int(limit / per_agent)} agents"
                      if per_agent else "")
                kill_all(conn, running)
                print(f"\nfilled to {len(running)} agents in {fill_s:.0f} s; {free >> 30} GiB free "
                      "disk after")
            spawn = results[best]
            print(f"RESULT spawn_p50_ms={spawn['p50']:.1f} uss_mb={spawn['uss']:.1f} "
                  f"pss_mb={spawn['pss']:.1f} rss_mb={spawn['rss']:.1f} max_agents={held}")
            return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
