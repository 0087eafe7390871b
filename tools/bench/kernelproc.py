"""Boot a kernel for a benchmark: `python -m kernel` in a state dir, waited on until it answers
(and, booted with --preload, until its models have loaded)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def boot_kernel(state: Path, *flags: str, attempts: int = 600) -> subprocess.Popen[bytes]:
    """Start a kernel on `state` (logs to STATE/../kernel.log) and return once sys.null
    answers, or raise after `attempts` tries 0.1 s apart. With --preload, also once every model
    has loaded: the kernel answers while its models load, and a benchmark's first calls would
    otherwise time the load."""
    log = open(state.parent / "kernel.log", "ab")  # noqa: SIM115 - lives with the kernel
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--state-dir", str(state),
                             "--log-format", "text", *flags], stdout=log, stderr=log, cwd=ROOT)
    wait_answering(state, proc, attempts * 0.1)
    if "--preload" in flags:
        wait_models(state, proc, attempts * 0.1)
    return proc


def wait_models(state: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once no model of the kernel on `state` is loading; raise if one failed, the kernel
    exits, or `timeout` seconds pass."""
    import sdk

    deadline = time.monotonic() + timeout
    with sdk.connect(state_dir=state, timeout=5) as conn:
        while True:
            models = [d for d in conn.sys.stats().dependencies if d.kind == "model"]
            failed = [f"{d.name}: {d.error}" for d in models if d.state == "failed"]
            if failed:
                raise RuntimeError(f"model failed to load: {'; '.join(failed)}")
            if all(d.state not in ("unloaded", "loading") for d in models):
                return
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the kernel's models did not load")
            time.sleep(0.1)


def wait_answering(state: Path, proc: subprocess.Popen[bytes],
                   timeout: float) -> subprocess.Popen[bytes]:
    """Return `proc` once the kernel on `state` answers sys.null; raise if it exits first or
    does not answer within `timeout` seconds."""
    sys.path.insert(0, str(ROOT))
    import sdk

    deadline = time.monotonic() + timeout
    while True:
        try:
            with sdk.connect(state_dir=state, timeout=1) as conn:
                conn.sys.null()
            return proc
        except sdk.SyscallError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("kernel did not start") from None
            time.sleep(0.05)


@contextlib.contextmanager
def serving(kernel: subprocess.Popen[bytes], log: Path, grace: float = 30.0,
            tail: int = 40) -> Iterator[subprocess.Popen[bytes]]:
    """The body runs while `kernel` serves; an exception out of it prints the last `tail`
    lines of `log` first; either way the kernel is stopped (SIGTERM, SIGKILL after `grace`)."""
    try:
        yield kernel
    except Exception:
        lines = log.read_text(errors="replace").splitlines()[-tail:]
        print("kernel log (last lines):", *lines, sep="\n", file=sys.stderr)
        raise
    finally:
        kernel.send_signal(signal.SIGTERM)
        try:
            kernel.wait(grace)
        except subprocess.TimeoutExpired:
            kernel.kill()
