"""`agentos top`: a live terminal view of agents, LLM queues and callers, from `sys.stats`.

Rates (syscalls/s, CPU%) are differences between two samples; per-agent CPU and RSS come from
/proc, which the kernel's own uid may read. `q` quits; `--once` prints one frame and exits.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

import sdk
from sdk import abi, layout

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_sample(pid: int | None) -> tuple[float, int] | None:
    """(CPU seconds, RSS bytes) of a live process, or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK, rss_pages * _PAGE


@dataclass
class Sample:
    at: float
    stats: abi.Stats
    agents: list[abi.AgentInfo]
    models: dict[str, abi.ModelInfo] = field(default_factory=dict)
    procs: dict[int, tuple[float, int] | None] = field(default_factory=dict)


def sample(conn: sdk.Connection) -> Sample:
    stats = conn.sys.stats()
    agents = [a for a in conn.proc.ps() if a.state in ("starting", "running")]
    models = {m.name: m for m in conn.llm.models()}
    return Sample(time.monotonic(), stats, agents, models,
                  {a.id: _proc_sample(a.pid) for a in agents})


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}M"


def render(now: Sample, before: Sample | None) -> Group:
    s = now.stats
    dt = max(1e-6, now.at - before.at) if before else None
    rate = sum(s.syscalls.values()) - sum(before.stats.syscalls.values()) if before else 0
    head = Text.assemble(
        ("agentos ", "bold"), f"{s.version}  pid {s.pid}  up {s.uptime_s:.0f}s  ",
        f"agents {s.agents_running}  parked {s.calls_parked}  ",
        f"syscalls/s {rate / dt:.0f}  " if dt else "syscalls/s -  ",
        f"denials {sum(s.denials.values())}  ",
        ("q quits", "dim"))

    agents = Table(title="agents", title_justify="left", expand=True)
    for col in ("ID", "NAME", "STATE", "SANDBOX", "PID", "CPU%", "RSS", "SYSCALLS/s",
                "TOKENS"):
        agents.add_column(col, justify="right" if col not in ("NAME", "STATE") else "left")
    for a in now.agents:
        caller = s.callers.get(f"agent:{a.id}", {})
        prev = before.stats.callers.get(f"agent:{a.id}", {}) if before else {}
        proc, old = now.procs.get(a.id), before.procs.get(a.id) if before else None
        cpu = f"{100 * (proc[0] - old[0]) / dt:.0f}" if proc and old and dt else "-"
        calls = (f"{(caller.get('syscalls', 0) - prev.get('syscalls', 0)) / dt:.1f}"
                 if dt else "-")
        tokens = int(caller.get("prompt_tokens", 0) + caller.get("completion_tokens", 0))
        agents.add_row(str(a.id), a.name, a.state, a.sandbox or "-", str(a.pid or "-"), cpu,
                       _mb(proc[1]) if proc else "-", calls, str(tokens))

    llm = Table(title="LLM", title_justify="left", expand=True)
    for col in ("MODEL", "DTYPE", "WAITING", "RUNNING", "PREEMPTED", "BATCH", "TOK/S", "TOKENS",
                "PREEMPTIONS", "KV"):
        llm.add_column(col, justify="left" if col in ("MODEL", "DTYPE") else "right",
                       min_width=8 if col == "DTYPE" else None)  # bfloat16, whole at 80 columns
    routes = sorted(n for n, info in now.models.items() if info.backend == "route")
    for name in sorted((set(s.models) | set(s.llm_usage) | set(now.models)) - set(routes)):
        m, u = s.models.get(name, {}), s.llm_usage.get(name, {})
        info = now.models.get(name)
        # What a local model computes in once loaded (`auto` resolved); before, what was asked.
        dtype = ("-" if info is None or info.backend != "local"
                 else info.running_dtype or f"({info.dtype})")
        llm.add_row(name, dtype, f"{m.get('queued', m.get('waiting', 0)):.0f}",
                    f"{m.get('running', m.get('in_flight', 0)):.0f}",
                    f"{m.get('preempted', 0):.0f}", f"{m.get('batch_capacity', 0):.0f}",
                    f"{m.get('tokens_per_s', u.get('tokens_per_s', 0)):.1f}",
                    f"{u.get('completion_tokens', 0):.0f}",
                    f"{m.get('preemptions', 0) + m.get('memory_preemptions', 0):.0f}",
                    _mb(m.get("kv_bytes", 0)))

    # Names that pick a model per call (config [routes]): how many calls each sent where.
    routed = Table(title="routes", title_justify="left", expand=True)
    for col in ("ROUTE", "CALLS", "SENT TO"):
        routed.add_column(col, justify="right" if col == "CALLS" else "left")
    for name in routes:
        m = s.models.get(name, {})
        routed.add_row(name, f"{m.get('calls', 0):.0f}", ", ".join(
            f"{model} {m.get(f'route.{model}', 0):.0f}" for model in now.models[name].picks))

    callers = Table(title="callers (HTTP keys and users)", title_justify="left", expand=True)
    for col in ("PRINCIPAL", "SYSCALLS", "ERRORS", "DENIALS", "TOKENS"):
        callers.add_column(col, justify="left" if col == "PRINCIPAL" else "right")
    for principal, row in s.callers.items():
        if not principal.startswith("agent:"):
            callers.add_row(principal, f"{row['syscalls']:.0f}", f"{row['errors']:.0f}",
                            f"{row['denials']:.0f}",
                            f"{row['prompt_tokens'] + row['completion_tokens']:.0f}")
    return Group(head, agents, llm, *([routed] if routes else []), callers,
                 _dependencies(s.dependencies), _memory_line(s.memory))


def _dependencies(deps: list[abi.DependencyInfo]) -> Table:
    """MCP servers, the embedder and models: state, restarts, why it last failed."""
    table = Table(title="dependencies", title_justify="left", expand=True)
    for col in ("KIND", "NAME", "STATE", "RESTARTS", "ERROR"):
        table.add_column(col, justify="right" if col == "RESTARTS" else "left", no_wrap=True,
                         overflow="ellipsis", ratio=4 if col == "ERROR" else 1)
    for d in deps:
        style = "" if d.state in ("ready", "unloaded") else "bold red"
        table.add_row(d.kind, d.name, Text(d.state, style=style), str(d.restarts),
                      d.error or "")
    return table


def _memory_line(m: dict[str, float]) -> Text:
    """The memory manager's RAM tier and embedding counters (`Stats.memory`)."""
    if not m:
        return Text("memory: no memory manager figures", style="dim")
    return Text.assemble(
        ("memory ", "bold"), f"resident {m.get('resident', 0):.0f} ({_mb(m.get('ram_bytes', 0))})"
        f"  indexed namespaces {m.get('namespaces_indexed', 0):.0f}"
        f"  embedded {m.get('embedded', 0):.0f}  evictions {m.get('evictions', 0):.0f}"
        f"  reloads {m.get('reloads', 0):.0f}")


def _key_pressed(timeout: float) -> str | None:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return os.read(sys.stdin.fileno(), 1).decode(errors="replace") if ready else None


def cmd_top(args: argparse.Namespace) -> int:
    console = Console()
    with sdk.connect(state_dir=layout.state_dir(args.state_dir)) as conn:
        before = sample(conn)
        if args.once:
            time.sleep(min(args.interval, 1.0))
            console.print(render(sample(conn), before))
            return 0
        interactive = sys.stdin.isatty()
        saved = termios.tcgetattr(sys.stdin) if interactive else None
        try:
            if interactive:
                tty.setcbreak(sys.stdin.fileno())
            with Live(render(before, None), console=console, screen=True,
                      auto_refresh=False) as live:
                while True:
                    deadline = time.monotonic() + args.interval
                    while (left := deadline - time.monotonic()) > 0:
                        key = _key_pressed(left) if interactive else time.sleep(left)
                        if key in ("q", "Q"):
                            return 0
                    now = sample(conn)
                    live.update(render(now, before), refresh=True)
                    before = now
        finally:
            if saved is not None:
                termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


def add_commands(sub: Any) -> None:
    sp = sub.add_parser("top", help="live view of agents, LLM queues and callers (q quits)",
                        description="Live view of agents, LLM queues and callers (q quits).")
    sp.set_defaults(fn=cmd_top)
    sp.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    sp.add_argument("--once", action="store_true", help="print one frame and exit")
