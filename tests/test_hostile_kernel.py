"""Hostile agents run by the real kernel, each beside a well-behaved one: every attempt fails or
is contained, the kernel records what it can see in the audit log, the neighbour keeps working.

What the kernel cannot see (a syscall seccomp refused inside the agent) shows in the agent's
own report; what it can (a stolen token, a capped log, an agent killed by a limit) is audited."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from kernel.access.audit import AuditLog
from kernel.db import Database
from kernel.proc import sandbox
from tests.conftest import AGENTS, KernelProcess, agent, wait_until

HOSTILE = Path(__file__).resolve().parent / "hostile"
PROBE = sandbox.probe()


def _tiers() -> list[str]:
    tiers = []
    for tier in ("standard", "strict"):
        try:
            sandbox.plan(tier, PROBE)
        except sandbox.SandboxUnavailable as exc:
            tiers.append(pytest.param(tier, marks=pytest.mark.skip(
                reason=f"{tier} tier not available: {exc}")))
            continue
        # The standard tier reaches the interpreter through the host's permissions: one under
        # a 0700 directory (a pyenv in /root) cannot run as an agent's uid (README).
        blocked = sandbox.unreachable_dir(os.path.realpath(sys.executable), 200000, 200000)
        if tier == "standard" and blocked is not None:
            tiers.append(pytest.param(tier, marks=pytest.mark.skip(
                reason=f"standard tier cannot reach this interpreter: {blocked} is closed to "
                       "agent uids")))
            continue
        tiers.append(tier)
    return tiers


TIERS = _tiers()


@pytest.fixture(scope="module")
def hk() -> Iterator[KernelProcess]:
    # Not under pytest's 0700 tmp dirs: agents of their own uids must pass through to their
    # homes in the standard tier.
    base = Path(tempfile.mkdtemp(prefix="agentos-hk-"))
    base.chmod(0o711)
    k = KernelProcess(base / "state").start()
    yield k
    k.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tcp_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def audit(k: KernelProcess) -> list[dict]:
    return AuditLog(Database(k.state_dir / "kernel.db")).rows(limit=100000)


def last_json(conn: sdk.Connection, agent_id: int, stream: str = "stdout") -> dict:
    lines = conn.proc.logs(agent_id, stream).data.decode(errors="replace").strip().splitlines()
    assert lines, f"agent {agent_id} printed nothing on {stream}"
    return json.loads(lines[-1])


def steady(conn: sdk.Connection, tier: str, name: str) -> int:
    return conn.proc.spawn(str(AGENTS / "steady.py"), argv=["300"], sandbox=tier, name=name)


def assert_steady_ok(conn: sdk.Connection, agent_id: int) -> None:
    info = conn.proc.wait(agent_id, timeout=60)
    assert info.exit_status == 0 and info.result["ok"], info


@pytest.mark.parametrize("tier", TIERS)
def test_escapes_through_the_kernel_fail(hk: KernelProcess, tcp_port: int, tier: str) -> None:
    with hk.connect() as conn:
        victim = conn.proc.spawn(agent("blocker"), sandbox=tier, name=f"victim-{tier}")
        assert wait_until(lambda: conn.proc.logs(victim).data == b"blocking\n")
        vinfo = conn.proc.info(victim)
        home = hk.state_dir / "agents" / str(victim) / "home"
        (home / "notes").write_text("private")
        os.chown(home / "notes", vinfo.uid, vinfo.uid)
        with open(f"/proc/{vinfo.pid}/environ", "rb") as f:  # a token that leaked somehow
            stolen = next(e for e in f.read().split(b"\0")
                          if e.startswith(b"AGENTOS_TOKEN=")).split(b"=", 1)[1].decode()
        targets = {"key": str(hk.state_dir / "secret.key"), "db": str(hk.state_dir / "kernel.db"),
                   "admin_token": str(hk.state_dir / "admin.token"), "state": str(hk.state_dir),
                   "other_home": str(home), "other_pid": vinfo.pid, "tcp_port": tcp_port,
                   "admin_socket": str(hk.state_dir / "run" / "kernel.sock"),
                   "other_socket": str(hk.state_dir / "run" / "agents" / str(victim) /
                                       "kernel.sock"),
                   "kernel_pid": conn.sys.stats().pid, "stolen_token": stolen}
        good = steady(conn, tier, f"good-{tier}")
        bad = conn.proc.spawn(str(HOSTILE / "kernel_escape.py"), argv=[json.dumps(targets)],
                              sandbox=tier, name=f"escape-{tier}")
        assert conn.proc.wait(bad, timeout=60).exit_status == 0, conn.proc.logs(bad, "stderr")
        out = last_json(conn, bad)
        assert_steady_ok(conn, good)
        conn.proc.kill(victim, grace=0)
        conn.proc.wait(victim, timeout=30)
    # Strict shows a skeleton of the directories above its own binds, and nothing else.
    seen = out.pop("list_state")
    assert isinstance(seen, str) or not {"secret.key", "kernel.db", "admin.token"} & set(seen)
    failed = {name: result for name, result in out.items() if result is not None}
    assert failed == out, f"attacks that worked: {set(out) - set(failed)}"
    assert out["tcp_connect"] == "EPERM" and out["ptrace_kernel"] == "EPERM"  # seccomp
    assert out["stolen_token"] == "EPERM"
    assert not (home / "pwned").exists()
    denied = [e for e in audit(hk) if e["event"] == "deny" and e["principal"] == f"agent:{bad}"]
    assert denied and "audience" in denied[0]["detail"]["reason"]


@pytest.mark.parametrize("tier", TIERS)
def test_resource_attacks_are_contained(hk: KernelProcess, tier: str) -> None:
    with hk.connect() as conn:
        good = steady(conn, tier, f"neighbour-{tier}")
        attacks = {
            "bomb": conn.proc.spawn(str(HOSTILE / "bomb.py"), sandbox=tier,
                                    limits={"processes": 24}, name=f"bomb-{tier}"),
            "balloon": conn.proc.spawn(str(HOSTILE / "balloon.py"), sandbox=tier,
                                       limits={"address_space": 512 << 20},
                                       name=f"balloon-{tier}"),
            "fds": conn.proc.spawn(str(HOSTILE / "fds.py"), sandbox=tier,
                                   limits={"open_files": 64}, name=f"fds-{tier}"),
            "loud": conn.proc.spawn(str(HOSTILE / "loud.py"), sandbox=tier,
                                    limits={"log_bytes": 1 << 20}, name=f"loud-{tier}"),
            "flood": conn.proc.spawn(agent("flood"), sandbox=tier, name=f"flood-{tier}"),
        }
        for name in ("bomb", "balloon", "fds", "loud"):
            info = conn.proc.wait(attacks[name], timeout=90)
            assert info.exit_status == 0, (name, conn.proc.logs(attacks[name], "stderr").data)
        assert_steady_ok(conn, good)  # while the flood is still going
        assert conn.sys.null() is None
        conn.proc.kill(attacks["flood"], grace=0)
        flood = conn.proc.wait(attacks["flood"], timeout=30)
        bomb, balloon, fds = (last_json(conn, attacks[n]) for n in ("bomb", "balloon", "fds"))
        loud = conn.proc.info(attacks["loud"])
        loud_report = last_json(conn, attacks["loud"], "stderr")
    assert bomb["error"] == "EAGAIN" and bomb["forked"] < 24, bomb
    assert balloon["error"] == "MemoryError" and 0 < balloon["allocated_mib"] < 512, balloon
    assert fds["error"] == "EMFILE" and fds["opened"] < 64, fds
    stdout = hk.state_dir / "agents" / str(attacks["loud"]) / "stdout"
    assert loud_report["written"] == 64 << 20 and stdout.stat().st_size == 1 << 20
    assert loud.log_dropped == (64 << 20) - (1 << 20)
    assert flood.state == "killed"
    events = audit(hk)
    capped = [e for e in events if e["event"] == "log-capped"
              and e["detail"]["agent"] == attacks["loud"]]
    assert capped and capped[0]["detail"]["dropped"] == loud.log_dropped
    ended = {e["detail"]["agent"] for e in events if e["event"] == "exit"}
    assert set(attacks.values()) <= ended


@pytest.mark.parametrize("tier", TIERS)
def test_restart_does_not_follow_a_swapped_code_directory(hk: KernelProcess, tier: str) -> None:
    """Issue 15: a parent starts `HOME/sub/x.py` with `--restart on-failure` and, between
    runs, swaps `sub` for a symlink to `/proc/self/cwd`. Every start resolves and checks the
    code's path again: the restart is refused with a clear error, nothing runs after the
    swap, and the neighbour keeps working."""
    child_name = f"swapped-{tier}"
    with hk.connect() as conn:
        good = steady(conn, tier, f"calm-{tier}")
        parent = conn.proc.spawn(str(HOSTILE / "swapper.py"), sandbox=tier,
                                 argv=[json.dumps({"code": str(HOSTILE / "swapped.py"),
                                                   "name": child_name})],
                                 caps=["proc.spawn"], name=f"swapper-{tier}")
        assert wait_until(lambda: conn.proc.logs(parent).data.startswith(b"child "), 30)
        child = int(conn.proc.logs(parent).data.split()[1])
        assert wait_until(lambda: conn.proc.logs(child).data == b"ready\n", 30)
        conn.ipc.send(f"swapper-{tier}", "swap now")
        assert conn.proc.wait(parent, timeout=60).result == "swapped"
        conn.ipc.send(child_name, "fail now")  # its first run ends; the policy restarts it
        info = conn.proc.wait(child, timeout=60)
        assert_steady_ok(conn, good)
        stdout = conn.proc.logs(child).data
    assert info.state == "failed" and info.restarts == 1, info
    assert stdout == b"ready\n", stdout  # no run after the swap
    refused = [e for e in audit(hk) if e["event"] == "spawn-failed"
               and e["detail"]["agent"] == child]
    assert refused and "reached through a symlink" in refused[0]["detail"]["error"], refused
