"""The CLI never hides a failure: `boot --daemon` never prints a pid that is not its kernel's,
and `wait` / `run --wait` say why an agent ended, with exit codes apart from the kernel's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TEST_TIER, KernelProcess, agent


def _cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userland.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_boot_daemon_prints_its_kernels_pid_and_refuses_a_held_state_dir(tmp_path: Path) -> None:
    state = str(tmp_path / "s")
    boot = ["--state-dir", state, "boot", "--daemon", "--sandbox", "none", "--log-format", "text"]
    first = _cli(*boot)
    assert first.returncode == 0, first.stderr
    pid = int(first.stdout)
    try:
        k = KernelProcess(Path(state))
        with k.connect() as conn:
            assert conn.sys.stats().pid == pid
        second = _cli(*boot)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr.startswith("agentos: EBUSY: ")
        assert f"pid {pid}" in second.stderr
        foreground = _cli(*boot[:-4], "--sandbox", "none")  # without --daemon: same answer
        assert foreground.returncode == 1 and f"EBUSY: a kernel (pid {pid})" in foreground.stderr
        os.kill(pid, 0)  # the running kernel is untouched
    finally:
        os.kill(pid, signal.SIGTERM)
    # Once it stops, the same state dir boots again with a new pid.
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        subprocess.run(["sleep", "0.05"])
    again = _cli(*boot)
    assert again.returncode == 0, again.stderr
    os.kill(int(again.stdout), signal.SIGTERM)


def test_wait_says_why_an_agent_failed(kernel: KernelProcess) -> None:
    ran = kernel.cli("run", agent("fails"))
    wait = kernel.cli("wait", ran.stdout.strip())
    assert wait.returncode == 1 and wait.stdout == ""
    assert "exited 1: RuntimeError: this agent fails on purpose" in wait.stderr
    assert f"agentos logs {ran.stdout.strip()}" in wait.stderr

    exits = kernel.cli("run", "--wait", agent("exits"), "--", "3")
    assert exits.returncode == 3 and "exited 3" in exits.stderr

    blocker = kernel.cli("run", agent("blocker")).stdout.strip()
    assert kernel.cli("kill", "-9", blocker).returncode == 0
    killed = kernel.cli("wait", blocker)
    assert killed.returncode == 137 and "killed by SIGKILL" in killed.stderr

    fine = kernel.cli("run", "--wait", agent("exits"), "--", "0")
    assert fine.returncode == 0 and fine.stderr == ""


def test_wait_exit_codes_keep_the_kernels_failures_apart(kernel: KernelProcess) -> None:
    missing = kernel.cli("wait", "999999")
    assert missing.returncode == 125 and missing.stderr.startswith("agentos: ENOENT: ")
    refused = kernel.cli("run", "--wait", "--cap", "bogus", agent("exits"))
    assert refused.returncode == 125 and refused.stderr.startswith("agentos: EINVAL: ")
    blocker = kernel.cli("run", agent("blocker")).stdout.strip()
    try:
        timed = kernel.cli("wait", "--timeout", "0.2", blocker)
        assert timed.returncode == 124 and "ETIMEDOUT" in timed.stderr
    finally:
        kernel.cli("kill", "-9", blocker)
    helped = kernel.cli("wait", "--help")
    assert "124" in helped.stdout and "125" in helped.stdout and "126" in helped.stdout


def test_a_failed_spawn_leaves_no_live_token(fresh_kernel: KernelProcess,
                                             tmp_path: Path) -> None:
    """A start the launcher refuses after the kernel minted the agent's token (here: an
    interpreter that is not there) revokes that token; `run --wait` says it never started."""
    config = tmp_path / "agentos.toml"
    config.write_text('[kernel]\nagent_python = "/nonexistent/bin/python3"\n')
    fresh_kernel.extra_args = ["--config", str(config)]
    k = fresh_kernel.start()
    out = k.cli("run", agent("exits"))
    assert out.returncode == 1 and out.stderr.startswith("agentos: E"), out
    with k.connect() as conn:
        failed = [a for a in conn.proc.ps() if a.state == "failed"]
        assert len(failed) == 1, (out, conn.proc.ps())
        subject = f"agent:{failed[0].id}"
        minted = conn.caps.list(subject=subject, all=True)
        live = conn.caps.list(subject=subject)
    assert minted and live == [], (TEST_TIER, minted, live)
