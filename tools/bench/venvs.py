"""Per-agent environments: build time cold and warm, and agent start with a cached one.

    .venv/bin/python tools/bench/venvs.py [--starts 5] [--requirements FILE] [--pip]

Offline by default: the requirements are one tiny wheel made here, installed with
--no-index --find-links (give `--requirements FILE` to time real packages from the registry).
Cold: a fresh venv cache and fresh package caches (uv's and pip's: a new machine, a clean CI),
`userland.venvs.build` from nothing (uv where it is found, else venv + pip; `--pip` hides uv).
Rebuilt: the environment removed and built again with the package cache now warm (a changed
requirements file on the same machine). Warm: the same call again (the hash finds it).
Start: `agentos run --wait` of a trivial agent, whole command (build lookup, spawn, sandbox,
interpreter start, exit), in the kernel's default tier, with the cached environment and
without one; medians of `--starts`. Last line:
`RESULT cold_s=… rebuilt_s=… warm_s=… start_venv_s=… start_plain_s=…`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernelproc import boot_kernel  # noqa: E402

from tests.wheels import make_wheel  # noqa: E402
from userland import venvs  # noqa: E402

AGENT = '''
from sdk import Agent


class Quick(Agent):
    def run(self, task):
        import importlib.util
        return importlib.util.find_spec("tinydep") is not None
'''


def timed_run(state: Path, code: Path, env: dict[str, str], *flags: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "userland.cli", "--state-dir", str(state),
                           "run", "--wait", *flags, str(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"agentos run failed: {done.stderr}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--requirements", type=Path)
    p.add_argument("--pip", action="store_true", help="build with pip even where uv is found")
    opts = p.parse_args()
    if opts.pip:
        venvs._uv = lambda: None
    with tempfile.TemporaryDirectory(prefix="venvbench-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)  # the standard tier reaches the agent's code by the host's modes
        env = {**os.environ, venvs.ENV_DIR: str(base / "cache"),
               "UV_CACHE_DIR": str(base / "uv-cache"), "PIP_CACHE_DIR": str(base / "pip-cache")}
        if opts.requirements is None:
            make_wheel(base / "wheels")
            env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(base / "wheels"), UV_NO_INDEX="1",
                       UV_FIND_LINKS=str(base / "wheels"))
            text = "tinydep==1.0\n"
        else:
            text = opts.requirements.read_text()
        os.environ.update(env)
        log = open(os.devnull, "w")  # noqa: SIM115
        started = time.perf_counter()
        built = venvs.build(text, base, log=log)
        cold = time.perf_counter() - started
        shutil.rmtree(built)
        started = time.perf_counter()
        venvs.build(text, base, log=log)
        rebuilt = time.perf_counter() - started
        started = time.perf_counter()
        venvs.build(text, base, log=log)
        warm = time.perf_counter() - started

        agent_dir = base / "agent"
        agent_dir.mkdir(mode=0o755)
        (agent_dir / "requirements.txt").write_text(text)
        code = agent_dir / "quick.py"
        code.write_text(AGENT)
        state = base / "state"
        kernel = boot_kernel(state)
        try:
            timed_run(state, code, env)  # first start: page cache, the kernel's first spawn
            with_venv = [timed_run(state, code, env) for _ in range(opts.starts)]
            plain = [timed_run(state, code, env, "--no-venv") for _ in range(opts.starts)]
        finally:
            kernel.terminate()
            kernel.wait(30)
        print(f"venv {built}")
        print(f"build ({'pip' if opts.pip or not venvs._uv() else 'uv'}) cold {cold:.2f} s, "
              f"rebuilt with the package cache warm {rebuilt:.2f} s, warm {warm * 1000:.0f} ms")
        print(f"agentos run --wait, median of {opts.starts}: with the cached venv "
              f"{statistics.median(with_venv):.2f} s, without {statistics.median(plain):.2f} s")
        print(f"RESULT cold_s={cold:.2f} rebuilt_s={rebuilt:.2f} warm_s={warm:.3f} "
              f"start_venv_s={statistics.median(with_venv):.2f} "
              f"start_plain_s={statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
