"""Kernel lifecycle with real processes: boot, SIGTERM drain, SIGKILL recovery, sd_notify."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sdk
from kernel.access.audit import AuditLog
from kernel.db import Database
from tests.conftest import ROOT, KernelProcess, agent, wait_until


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_dir_is_private(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    s = fresh_kernel.state_dir
    # A root kernel's agents have uids of their own and must pass through (never list) these.
    shared = 0o711 if os.geteuid() == 0 else 0o700
    assert _mode(s) == shared and _mode(s / "run") == shared and _mode(s / "agents") == shared
    assert _mode(s / "secret.key") == 0o600 and _mode(s / "admin.token") == 0o600
    assert _mode(s / "run" / "kernel.sock") == 0o600
    assert sqlite3.connect(s / "kernel.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    key = (s / "secret.key").read_bytes()
    assert fresh_kernel.stop() == 0
    fresh_kernel.start()  # the key is created once and kept
    assert (s / "secret.key").read_bytes() == key


def test_second_kernel_on_same_state_dir_is_refused(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    out = subprocess.run([sys.executable, "-m", "kernel", "--state-dir",
                          str(fresh_kernel.state_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    assert out.returncode == 1 and "another kernel is running" in out.stderr
    with fresh_kernel.connect() as conn:
        assert conn.sys.null() is None


def test_sigterm_drains_agents_and_exits_zero(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    with fresh_kernel.connect() as conn:
        blocker = conn.proc.spawn(agent("blocker"))
        assert wait_until(lambda: conn.proc.logs(blocker).data == b"blocking\n")
        pid = conn.proc.info(blocker).pid
        assert fresh_kernel.stop(signal.SIGTERM) == 0
    assert not (fresh_kernel.state_dir / "run" / "kernel.sock").exists()
    assert not Path(f"/proc/{pid}").exists()
    db = sqlite3.connect(fresh_kernel.state_dir / "kernel.db")
    state, status = db.execute("SELECT state, exit_status FROM agents WHERE id=?",
                               (blocker,)).fetchone()
    assert (state, status) == ("killed", 128 + signal.SIGTERM)
    assert "kernel stopped" in fresh_kernel.log()


def test_sigkill_loses_nothing_acknowledged(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    with fresh_kernel.connect() as conn:
        sleeper = conn.proc.spawn(agent("sleeper"))
        idle = conn.proc.spawn(agent("idle"), name="idle")
        assert wait_until(lambda: conn.proc.logs(sleeper).data == b"acked\n")
        assert wait_until(lambda: conn.proc.logs(idle).data == b"idle\n")
        conn.ipc.send("idle", {"n": 1})  # acknowledged: must be on disk now
        orphan = conn.proc.info(sleeper).pid
        fresh_kernel.stop(signal.SIGKILL)
    db = sqlite3.connect(fresh_kernel.state_dir / "kernel.db")
    assert db.execute("SELECT COUNT(*) FROM messages WHERE receiver=?", (idle,)).fetchone()[0] == 1
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    # The launcher set PR_SET_PDEATHSIG: the agent dies with its kernel.
    assert wait_until(lambda: not Path(f"/proc/{orphan}").exists()
                      or "Z" in Path(f"/proc/{orphan}/stat").read_text().split(")")[1][:3])

    fresh_kernel.start()  # recovery: the old agents are lost, and anything left is killed
    with fresh_kernel.connect() as conn:
        info = conn.proc.info(sleeper)
        assert info.state == "lost" and info.result == {"answer": 42}
        assert conn.proc.info(idle).state == "lost"
    assert wait_until(lambda: not Path(f"/proc/{orphan}").exists()
                      or "Z" in Path(f"/proc/{orphan}/stat").read_text().split(")")[1][:3])
    audit = AuditLog(Database(fresh_kernel.state_dir / "kernel.db"))
    assert audit.verify() is None
    assert {r["event"] for r in audit.rows()} >= {"grant", "spawn", "lost"}


def test_audit_chain_detects_tampering(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    with fresh_kernel.connect() as conn:
        conn.proc.wait(conn.proc.spawn(agent("exits")), timeout=30)
    fresh_kernel.stop()
    db = Database(fresh_kernel.state_dir / "kernel.db")
    audit = AuditLog(db)
    assert audit.verify() is None
    db.conn.execute("UPDATE audit SET detail='{}' WHERE seq=2")
    assert audit.verify() == 2


def test_sd_notify_ready_watchdog_stopping(fresh_kernel: KernelProcess, tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(20)
    fresh_kernel.env.update({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    fresh_kernel.start(wait=False)
    messages: list[str] = []

    def until(field: str) -> None:
        while not any(field in m for m in messages):
            messages.append(listener.recv(4096).decode())

    until("READY=1")
    assert any(f"MAINPID={fresh_kernel.proc.pid}" in m for m in messages)
    # Pings keep coming from the loop (every 50 ms, half WATCHDOG_USEC): five of them within
    # 5 s, a bound with a tenfold headroom.
    start, began = len(messages), time.monotonic()
    while sum(m == "WATCHDOG=1" for m in messages[start:]) < 5:
        messages.append(listener.recv(4096).decode())
    assert time.monotonic() - began < 5.0
    fresh_kernel.send_signal(signal.SIGTERM)
    until("STOPPING=1")
    assert fresh_kernel.stop() == 0
    listener.close()


def test_daemon_mode_and_cli_against_it(tmp_path: Path) -> None:
    state = tmp_path / "d"
    env = {**os.environ, "AGENTOS_STATE_DIR": str(state)}
    cli = [sys.executable, "-m", "userland.cli"]
    boot = subprocess.run([*cli, "boot", "--daemon"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert boot.returncode == 0, boot.stderr
    pid = int(boot.stdout)
    try:
        run = subprocess.run([*cli, "run", "--wait", agent("exits"), "--", "4"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert run.returncode == 4
        with sdk.connect(state_dir=state) as conn:
            assert conn.sys.stats().pid == pid
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists()
                      or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3], 30)
    assert "kernel stopped" in (state / "kernel.log").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_exit_zero(fresh_kernel: KernelProcess, sig: int) -> None:
    fresh_kernel.start()
    assert fresh_kernel.stop(sig) == 0
