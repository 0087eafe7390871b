"""The agentos CLI behaves like a Unix tool: stdout for results, stderr for errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, KernelProcess, agent


def test_run_prints_only_the_id_and_wait_exits_with_the_status(kernel: KernelProcess) -> None:
    run = kernel.cli("run", agent("exits"), "--", "7")
    assert run.returncode == 0 and run.stdout.strip().isdigit() and run.stderr == ""
    wait = kernel.cli("wait", run.stdout.strip())
    assert wait.returncode == 7


def test_wait_prints_the_result(kernel: KernelProcess) -> None:
    run = kernel.cli("run", "--name", "clihello", str(ROOT / "userland/agents/hello.py"), "--",
                     "from", "the", "cli")
    wait = kernel.cli("wait", "--json", run.stdout.strip())
    assert wait.returncode == 0
    info = json.loads(wait.stdout)
    assert info["result"]["task"] == "from the cli" and info["name"] == "clihello"


def test_ps_json_and_all(kernel: KernelProcess) -> None:
    run = kernel.cli("run", agent("exits"))
    kernel.cli("wait", run.stdout.strip())
    running = json.loads(kernel.cli("ps", "--json").stdout)
    everything = json.loads(kernel.cli("ps", "-a", "--json").stdout)
    ids = {a["id"] for a in everything}
    assert int(run.stdout) in ids and int(run.stdout) not in {a["id"] for a in running}
    table = kernel.cli("ps", "-a")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == [
        "ID", "NAME", "STATE"]


def test_logs_streams(kernel: KernelProcess) -> None:
    run = kernel.cli("run", agent("fails"))
    agent_id = run.stdout.strip()
    assert kernel.cli("wait", agent_id).returncode == 1
    both = kernel.cli("logs", agent_id)
    assert "fails on purpose" in both.stderr
    only_out = kernel.cli("logs", "--stdout", agent_id)
    assert only_out.stderr == ""
    follow = kernel.cli("logs", "-f", agent_id, timeout=10)
    assert follow.returncode == 0


def test_kill_and_errors(kernel: KernelProcess) -> None:
    run = kernel.cli("run", agent("blocker"))
    agent_id = run.stdout.strip()
    assert kernel.cli("kill", "-9", agent_id).returncode == 0
    assert kernel.cli("wait", agent_id).returncode == 137
    missing = kernel.cli("kill", "999999")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("agentos: ENOENT")
    ended = kernel.cli("kill", agent_id)
    assert ended.returncode == 1 and "not running" in ended.stderr


def test_usage_errors_exit_2(kernel: KernelProcess) -> None:
    assert kernel.cli("wait").returncode == 2
    assert kernel.cli("frobnicate").returncode == 2


def test_no_kernel_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "userland.cli", "--state-dir", str(tmp_path),
                          "ps"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "no kernel has booted" in out.stderr


def test_state_dir_from_environment(kernel: KernelProcess) -> None:
    env = {**os.environ, "AGENTOS_STATE_DIR": str(kernel.state_dir)}
    out = subprocess.run([sys.executable, "-m", "userland.cli", "stats", "--json"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["abi"] == 1


def test_run_refuses_bad_capabilities(kernel: KernelProcess) -> None:
    out = kernel.cli("run", "--cap", "bogus", agent("exits"))
    assert out.returncode == 1 and "EINVAL" in out.stderr


def test_boot_is_the_kernel_itself_with_every_flag(tmp_path: Path) -> None:
    """`agentos boot` execs `python -m kernel` (same pid, as systemd's Type=notify needs) and
    hands it every flag; the kernel's own parser answers `--help` and bad flags."""
    state = tmp_path / "s"
    cli = [sys.executable, "-m", "userland.cli"]
    helped = subprocess.run([*cli, "boot", "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert helped.returncode == 0
    for flag in ("--config", "--log-format", "--log-level", "--model", "--scheduler",
                 "--preload", "--listen", "--sandbox", "--http", "--daemon", "--state-dir"):
        assert flag in helped.stdout
    bad = subprocess.run([*cli, "boot", "--scheduler", "nope"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr

    booted = subprocess.Popen([*cli, "--state-dir", str(state), "boot", "--sandbox", "none",
                               "--log-format", "text", "--http", "127.0.0.1:0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    k = KernelProcess(state)
    k.proc = booted  # type: ignore[assignment]
    try:
        k.wait_ready(timeout=60)
        with k.connect() as conn:
            assert conn.sys.stats().pid == booted.pid
        assert (state / "run" / "http").is_file()  # --http reached the kernel
    finally:
        booted.terminate()
        assert booted.wait(30) == 0
    log = booted.stderr.read().decode()
    assert "kernel stopped" in log and not log.startswith("{")  # --log-format text, not json
