"""Boot a kernel for a benchmark: `python -m kernel` in a state dir, waited on until it answers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def boot_kernel(state: Path, *flags: str, attempts: int = 600) -> subprocess.Popen[bytes]:
    """Start a kernel on `state` (logs to STATE/../kernel.log) and return once sys.null
    answers, or raise after `attempts` tries 0.1 s apart."""
    sys.path.insert(0, str(ROOT))
    import sdk

    log = open(state.parent / "kernel.log", "ab")  # noqa: SIM115 - lives with the kernel
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--state-dir", str(state),
                             "--log-format", "text", *flags], stdout=log, stderr=log, cwd=ROOT)
    for _ in range(attempts):
        try:
            with sdk.connect(state_dir=state, timeout=1) as conn:
                conn.sys.null()
            return proc
        except sdk.SyscallError:
            time.sleep(0.1)
    raise RuntimeError("kernel did not start")
