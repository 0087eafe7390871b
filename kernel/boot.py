"""`python -m kernel` / `agentos boot`: parse flags, set up logging, run the kernel."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from kernel.config import Config, parse_model_flag
from kernel.state import StateError
from sdk import layout
from sdk.models import DTYPES

log = logging.getLogger("kernel")


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get(layout.ENV_CONFIG)
    p.add_argument("--config", type=Path, default=Path(env) if env else None,
                   help=f"TOML file with a [kernel] table (default ${layout.ENV_CONFIG})")
    p.add_argument("--log-format", choices=("json", "text"), help="log format (default json)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--model", action="append", metavar="NAME[=SOURCE]",
                   help="serve this model (repeatable; the first is the default); SOURCE is a "
                        "model-cache name, a local dir or .gguf, or an OpenAI-compatible URL. "
                        "Default: smollm2 from the model cache")
    p.add_argument("--alias", action="append", default=[], metavar="NAME=MODEL",
                   help="another name for a served model (repeatable), as [aliases] in the "
                        "config: --alias gpt-4o-mini=smollm2")
    p.add_argument("--scheduler", choices=("fifo", "rr", "priority", "fair", "las"),
                   help="LLM scheduling policy for every model (default fair)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="what every local model computes in (default auto: bfloat16 where the "
                        "CPU or GPU runs it natively, else float32)")
    p.add_argument("--preload", action="store_true", default=None,
                   help="load the models at boot, not at their first request")
    p.add_argument("--listen", metavar="tcp://HOST:PORT",
                   help="also accept remote agents there, CurveZMQ-authenticated (keys: "
                        "agentos agent add-key)")
    p.add_argument("--sandbox", choices=("none", "standard", "strict"),
                   help="the agents' default sandbox tier (default strict); an agent whose tier "
                        "this machine cannot apply is refused")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the OpenAI- and AIOS-compatible HTTP APIs and /metrics here "
                        "(off by default; port 0 picks one, written to STATE_DIR/run/http)")
    p.add_argument("--daemon", action="store_true",
                   help="start in the background, wait until it answers, then exit 0; "
                        "logs go to STATE_DIR/kernel.log")


def holder(state: Path) -> int | None:
    """The pid of the kernel that holds `state`'s lock, or None when no kernel does."""
    import fcntl

    try:
        fd = os.open(state / "kernel.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)  # closing drops the probe's shared lock at once


def _busy(state: Path, pid: int) -> int:
    shown = f"pid {pid}" if pid else "pid unknown"
    print(f"agentos: EBUSY: a kernel ({shown}) already holds {state}; stop it first "
          f"(kill {pid or 'PID'}) or boot with another --state-dir", file=sys.stderr)
    return 1


def daemonize(args: argparse.Namespace, state: Path) -> int:
    """Re-run the kernel detached (new session, logs to a file) and wait until it answers;
    print its pid. Exit 1 (printing nothing on stdout) when another kernel holds `state`:
    a script's `PID=$(agentos boot --daemon)` must never get a pid that is not its kernel's."""
    import sdk

    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    running = holder(state)
    if running is not None:
        return _busy(state, running)
    child_argv = ["--state-dir", str(state)]
    if args.config:
        child_argv += ["--config", str(args.config)]
    if args.log_format:
        child_argv += ["--log-format", args.log_format]
    if args.log_level:
        child_argv += ["--log-level", args.log_level]
    for model in args.model or ():
        child_argv += ["--model", model]
    if args.scheduler:
        child_argv += ["--scheduler", args.scheduler]
    if args.dtype:
        child_argv += ["--dtype", args.dtype]
    if args.preload:
        child_argv += ["--preload"]
    if args.listen:
        child_argv += ["--listen", args.listen]
    if args.sandbox:
        child_argv += ["--sandbox", args.sandbox]
    if args.http:
        child_argv += ["--http", args.http]
    with open(state / "kernel.log", "ab") as logf:
        child = subprocess.Popen([sys.executable, "-m", "kernel", *child_argv],
                                 stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if child.poll() is not None:
            running = holder(state)
            if running is not None and running != child.pid:  # lost a race to another boot
                return _busy(state, running)
            print(f"agentos: EIO: the kernel exited with status {child.returncode}; see "
                  f"{state / 'kernel.log'}", file=sys.stderr)
            return 1
        try:
            # Ready means *this* kernel answers: the socket may still be an older one's.
            with sdk.connect(state_dir=state, timeout=1.0) as conn:
                ready = conn.sys.stats().pid == child.pid
        except sdk.SyscallError:
            ready = False
        if ready:
            print(child.pid)
            return 0
        time.sleep(0.05)
    print(f"agentos: ETIMEDOUT: the kernel (pid {child.pid}) did not answer in 30 s; see "
          f"{state / 'kernel.log'}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m kernel", description="Boot the agentos kernel.")
    p.add_argument("--state-dir", help=f"state directory (default ${layout.ENV_STATE_DIR} or "
                                       f"{layout.default_state_dir()})")
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    state = layout.state_dir(args.state_dir)
    if args.daemon:
        return daemonize(args, state)
    try:
        models = None
        if args.model:
            flags = [parse_model_flag(text) for text in args.model]
            flags[0].default = True
            models = {m.name: m for m in flags}
        config = Config.load(args.config, state_dir=state, log_format=args.log_format,
                             log_level=args.log_level, models=models, preload=args.preload,
                             listen=args.listen, sandbox=args.sandbox, http=args.http)
        for text in args.alias:
            alias, sep, target = text.partition("=")
            if not (sep and alias and target):
                raise ValueError(f"bad --alias {text!r}: want NAME=MODEL")
            config.aliases[alias] = target
        config.check_routes()
        for model in config.models.values():
            model.scheduler = args.scheduler or model.scheduler
            model.dtype = args.dtype or model.dtype
    except (OSError, ValueError, TypeError) as exc:
        print(f"agentos: EINVAL: bad configuration: {exc}", file=sys.stderr)
        return 2
    from kernel import log as kernel_log
    from kernel.core import Kernel

    kernel_log.setup(config.log_format, config.log_level)
    try:
        return Kernel(config).run()
    except StateError as exc:
        log.error(str(exc))
        running = holder(state)
        if running is not None:
            return _busy(state, running)
        print(f"agentos: EINVAL: {exc}", file=sys.stderr)
        return 1


def exit_now(code: int) -> None:
    """End the kernel's process with `code` once `main` has returned. Everything the kernel
    holds is closed by then (its database, state dir, sockets, children), so the interpreter's
    teardown is skipped: with torch and transformers imported (a model was loaded) it frees
    hundreds of thousands of objects one by one, which made every stop 1-4 s longer."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    exit_now(main())
