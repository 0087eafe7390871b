"""`agentos`: the command line, a userland program that makes syscalls with the admin token.

Unix manners: results on stdout, diagnostics on stderr as `agentos: CODE: message`, `--json`
for scripts, exit 0 on success, 1 when the kernel refuses or is unreachable, 2 on bad usage.
`wait` and `run --wait` exit with the agent's own status, and keep their own failures apart
from it the way timeout(1) does: 124 when `--timeout` ran out, 125 when the kernel refused or
could not be reached, 126 when the agent ended without a status (it never started, or was lost
with a crashed kernel), 128+N when signal N killed it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

import sdk
from sdk import layout
from userland.subcommand import JSON_HELP, subcommand

EXIT_ERROR = 1
EXIT_USAGE = 2
# `wait` and `run --wait` only, beside the agent's own status (as timeout(1) and env(1) do).
EXIT_TIMEOUT = 124
EXIT_REFUSED = 125
EXIT_NO_STATUS = 126


def _connect(args: argparse.Namespace) -> sdk.Connection:
    return sdk.connect(state_dir=layout.state_dir(args.state_dir))


def _json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=None, default=repr))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _show_result(result: Any) -> None:
    if result is None:
        return
    print(result if isinstance(result, str) else json.dumps(result, default=repr))


# --- subcommands ---------------------------------------------------------------------------


def cmd_boot(args: argparse.Namespace) -> int:
    # The kernel is a program of its own; exec keeps this pid, which systemd's Type=notify
    # and `agentos boot --daemon` (the kernel's own flag, which prints the daemon's pid) need.
    argv = [sys.executable, "-m", "kernel"]
    if args.state_dir:
        argv += ["--state-dir", args.state_dir]
    os.execv(sys.executable, argv + args.kernel_args)


def cmd_run(args: argparse.Namespace) -> int:
    from userland.proc_cli import spawn_options
    from userland.venvs import BuildError

    path = Path(args.path).expanduser().absolute()
    try:
        options = spawn_options(args)  # builds the agent's environment, if it brings one
    except BuildError as exc:
        print(f"agentos: cannot build the agent's environment: {exc}", file=sys.stderr)
        return EXIT_REFUSED if args.wait else EXIT_ERROR
    with _connect(args) as conn:
        agent_id = conn.proc.spawn(str(path), name=args.name, argv=args.args, caps=args.cap,
                                   group=args.group, **options)
        if not args.wait:
            print(agent_id)
            return 0
        info = conn.proc.wait(agent_id)
        _show_result(info.result)
        return _ended(conn, info)


def _stderr_tail(conn: sdk.Connection, agent_id: int, keep: int = 4096) -> str:
    """The last `keep` bytes of an agent's captured stderr."""
    tail, offset = b"", 0
    while True:
        chunk = conn.proc.logs(agent_id, "stderr", offset)
        if not chunk.data:
            return tail.decode(errors="replace")
        tail, offset = (tail + chunk.data)[-keep:], chunk.offset


def _ended(conn: sdk.Connection, info: sdk.abi.AgentInfo) -> int:
    """Say on stderr why an agent that did not succeed ended; its exit code for the shell."""
    status = info.exit_status
    if status == 0:
        return 0
    who = f"agent {info.id} ({info.name})"
    if status is None:
        why = "could not start" if info.state == "failed" else f"ended {info.state}, no status"
        print(f"agentos: {who} {why}; see `agentos ps -a -l` and the kernel's log",
              file=sys.stderr)
        return EXIT_NO_STATUS
    if info.state == "killed" and status > 128:
        try:
            why = f"killed by {signal.Signals(status - 128).name}"
        except ValueError:
            why = f"killed by signal {status - 128}"
    else:
        lines = [line for line in _stderr_tail(conn, info.id).splitlines() if line.strip()]
        why = f"exited {status}" + (f": {lines[-1].strip()}" if lines else "")
    print(f"agentos: {who} {why} (its output: agentos logs {info.id})", file=sys.stderr)
    return status


def cmd_ps(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        agents = conn.proc.ps()
    if not args.all:
        agents = [a for a in agents if a.state in ("starting", "running", "suspended",
                                                   "restarting")]
    if args.json:
        _json(agents)
        return 0
    print(f"{'ID':>5}  {'NAME':<20} {'STATE':<8} {'PID':>7} {'STATUS':>6}  {'STARTED':<19}  "
          f"{'SANDBOX':<8}  PATH")
    for a in agents:
        status = "-" if a.exit_status is None else str(a.exit_status)
        pid = "-" if a.pid is None else str(a.pid)
        print(f"{a.id:>5}  {a.name:<20} {a.state:<8} {pid:>7} {status:>6}  "
              f"{_when(a.started_at):<19}  {a.sandbox or '-':<8}  {a.path}")
        if args.layers:
            print(f"       {a.layers or '-'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        info = conn.proc.info(args.id)
    if args.json:
        _json(info)
        return 0
    for key, value in msgspec.to_builtins(info).items():
        if key.endswith("_at"):
            value = _when(value)
        elif not isinstance(value, str):
            value = json.dumps(value, ensure_ascii=False, default=repr)
        print(f"{key}: {value}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        try:
            info = conn.proc.wait(args.id, timeout=args.timeout)
        except sdk.TimedOut:
            print(f"agentos: ETIMEDOUT: agent {args.id} is still running", file=sys.stderr)
            return EXIT_TIMEOUT
        if args.json:
            _json(info)
        else:
            _show_result(info.result)
        return _ended(conn, info)


def cmd_kill(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        conn.proc.kill(args.id, grace=0 if args.force else args.grace)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    streams = [s for s in ("stdout", "stderr") if getattr(args, s)] or ["stdout", "stderr"]
    offsets = dict.fromkeys(streams, 0)
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    with _connect(args) as conn:
        while True:
            ended = True
            for stream in streams:
                while True:
                    chunk = conn.proc.logs(args.id, stream, offsets[stream])
                    sinks[stream].write(chunk.data)
                    sinks[stream].flush()
                    offsets[stream] = chunk.offset
                    if not chunk.data:
                        break
                ended = ended and chunk.eof
            if not args.follow or ended:
                return 0
            time.sleep(0.2)


def cmd_stats(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        stats = conn.sys.stats()
    if args.json:
        _json(stats)
        return 0
    print(f"kernel {stats.version} (ABI {stats.abi}), pid {stats.pid}, up {stats.uptime_s:.0f} s")
    print(f"agents running: {stats.agents_running}")
    for name, count in sorted(stats.syscalls.items()):
        print(f"  {name:<12} {count}")
    if stats.errors:
        print("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.errors.items())))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        start = time.perf_counter()
        conn.sys.null()
        elapsed = time.perf_counter() - start
    print(f"kernel answered in {elapsed * 1e6:.0f} µs")
    return 0


# --- parser --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("agentos")
    except PackageNotFoundError:
        ver = "unknown"
    p = argparse.ArgumentParser(prog="agentos", description="An operating system for LLM agents.")
    p.add_argument("--version", action="version", version=f"agentos {ver}")
    p.add_argument("--state-dir", metavar="DIR",
                   help=f"the kernel's state directory (default ${layout.ENV_STATE_DIR} or "
                        f"{layout.default_state_dir()})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = partial(subcommand, sub)

    # Every other argument after `boot` is the kernel's (`agentos boot --help` shows them).
    command("boot", cmd_boot, "boot the kernel (foreground unless --daemon)",
            add_help=False)

    sp = command("run", cmd_run, "spawn an agent program; print its id")
    sp.add_argument("path", help="the agent program (a Python file)")
    sp.add_argument("args", nargs="*", help="arguments for the agent (its task); put them after --")
    sp.add_argument("--name", help="agent name (default: the file's stem); unique while running")
    sp.add_argument("--cap", action="append", default=[], metavar="OP[@RESOURCE]",
                    help="grant a right, e.g. ipc.send@ipc/bob or 'proc.*' (repeatable)")
    sp.add_argument("--wait", action="store_true",
                    help="wait for it, print its result and exit with its status (as `wait`)")
    sp.add_argument("--group", metavar="NAME",
                    help="grant a privilege group's rights and limits ([groups.NAME] in the "
                         "kernel config)")
    from userland.proc_cli import add_run_arguments

    add_run_arguments(sp)

    sp = command("ps", cmd_ps, "list agents (running ones unless -a)")
    sp.add_argument("-a", "--all", action="store_true", help="include agents that have ended")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.add_argument("-l", "--layers", action="store_true",
                    help="show the sandbox layers applied to each agent")

    sp = command("info", cmd_info, "show one agent")
    sp.add_argument("id", type=int)
    sp.add_argument("--json", action="store_true", help=JSON_HELP)

    sp = command("wait", cmd_wait, "wait for an agent; print its result; exit with its status",
                 epilog="exit status: the agent's own; 128+N when signal N killed it; 124 when "
                        "--timeout ran out; 125 when the kernel refused or could not be reached; "
                        "126 when the agent ended without a status (it never started). Why a "
                        "failed agent ended goes to stderr.")
    sp.add_argument("id", type=int)
    sp.add_argument("--timeout", type=float, metavar="SECONDS")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)

    sp = command("kill", cmd_kill, "stop an agent: SIGTERM, then SIGKILL after the grace period")
    sp.add_argument("id", type=int)
    sp.add_argument("--grace", type=float, default=5.0, metavar="SECONDS")
    sp.add_argument("-9", "--force", action="store_true", help="SIGKILL at once")

    sp = command("logs", cmd_logs, "print an agent's captured stdout and stderr")
    sp.add_argument("id", type=int)
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
    sp.add_argument("--stdout", action="store_true", help="only stdout")
    sp.add_argument("--stderr", action="store_true", help="only stderr")

    sp = command("stats", cmd_stats, "kernel statistics")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)

    command("ping", cmd_ping, "check that the kernel answers (sys.null)")

    from userland.model_cli import add_commands

    add_commands(sub)
    from userland.agent_cli import add_commands as add_agent_commands

    add_agent_commands(sub)
    from userland import caps_cli, proc_cli

    proc_cli.add_commands(sub)
    caps_cli.add_commands(sub)
    from userland import memstore_cli

    memstore_cli.add_commands(sub)

    from userland.tool_cli import add_commands as add_tool_commands

    add_tool_commands(sub)
    from userland import top

    top.add_commands(sub)
    from userland import service_cli

    service_cli.add_commands(sub)
    return p


def hoist_globals(argv: list[str]) -> list[str]:
    """`--state-dir DIR` anywhere before a `--` moves to the front, so it works after the
    subcommand too (`agentos ps --state-dir DIR`); what follows `--` is the agent's."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "--state-dir" and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 2
            continue
        (front if arg.startswith("--state-dir=") else rest).append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(hoist_globals(sys.argv[1:] if argv is None else argv))
    if extra and args.command != "boot":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.kernel_args = extra
    try:
        return args.fn(args)
    except sdk.SyscallError as exc:
        print(f"agentos: {exc}", file=sys.stderr)
        waiting = args.command == "wait" or (args.command == "run" and args.wait)
        return EXIT_REFUSED if waiting else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `agentos ps | head`: the reader left; exit quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
