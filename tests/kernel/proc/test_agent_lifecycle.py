"""Agents through the real kernel: sandbox tiers, uid identity, suspend/resume, log caps,
restart policies, reconciliation after a kernel crash, cleanup within a second of death."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import sdk
from kernel.access.audit import AuditLog
from kernel.db import Database
from kernel.llm.sched import FairShare, Job
from sdk import abi
from tests.conftest import ROOT, TEST_TIER, KernelProcess, agent, wait_until

sandboxed = pytest.mark.skipif(TEST_TIER == "none", reason="no sandbox tier on this machine "
                               "(needs root; strict also needs bubblewrap)")


def audit_events(k: KernelProcess) -> list[dict]:
    return AuditLog(Database(k.state_dir / "kernel.db")).rows(limit=100000)


def ticks(conn: sdk.Connection, agent_id: int) -> int:
    lines = conn.proc.logs(agent_id, limit=1 << 20).data.split()
    return len(lines)


def test_ps_and_info_show_the_tier_and_layers(kernel: KernelProcess) -> None:
    with kernel.connect() as conn:
        a = conn.proc.spawn(agent("exits"), argv=["0"], name="tiers")
        info = conn.proc.wait(a, timeout=30)
    assert info.sandbox == TEST_TIER and info.layers.startswith(f"{TEST_TIER}:")
    if TEST_TIER != "none":
        assert info.uid is not None and f"uid {info.uid}" in info.layers
    out = kernel.cli("ps", "-a", "-l")
    assert out.returncode == 0 and TEST_TIER in out.stdout and info.layers in out.stdout


def test_unavailable_tier_is_refused_not_weakened(fresh_kernel: KernelProcess) -> None:
    # No bubblewrap on this kernel's PATH: strict cannot be applied, so it must be refused.
    fresh_kernel.env["PATH"] = "/nonexistent"
    fresh_kernel.extra_args = ["--sandbox", "strict"]
    fresh_kernel.start()
    with fresh_kernel.connect() as conn:
        with pytest.raises(sdk.SyscallError) as info:
            conn.proc.spawn(agent("exits"))
        assert info.value.code.name == "ENOSYS"
        assert "namespaces" in info.value.message and "weaker tier" in info.value.message
        weaker = conn.proc.spawn(agent("exits"), sandbox="none")  # asked for explicitly
        assert conn.proc.wait(weaker, timeout=30).exit_status == 0
    out = fresh_kernel.cli("run", agent("exits"))
    assert out.returncode == 1 and "ENOSYS" in out.stderr and "strict" in out.stderr


@sandboxed
def test_double_forked_child_is_still_its_agent(kernel: KernelProcess) -> None:
    with kernel.connect() as conn:
        a = conn.proc.spawn(agent("forker"), argv=[str(kernel.state_dir / "admin.token")])
        assert conn.proc.wait(a, timeout=30).exit_status == 0
        out = json.loads(conn.proc.logs(a).data.decode().strip().splitlines()[-1])
    assert out.get("info") == a, out  # attested by uid: its token's audience matches
    assert out["admin_token"] in ("PermissionError", "FileNotFoundError"), out


@sandboxed
def test_agents_see_only_their_own_endpoint(kernel: KernelProcess) -> None:
    with kernel.connect() as conn:
        a = conn.proc.spawn(agent("blocker"), name="ep")
        assert wait_until(lambda: conn.proc.logs(a).data == b"blocking\n")
        endpoint = kernel.state_dir / "run" / "agents" / str(a)
        st = os.stat(endpoint)
        assert st.st_mode & 0o777 == 0o710 and st.st_gid == conn.proc.info(a).uid
        assert os.stat(endpoint / "kernel.sock").st_mode & 0o777 == 0o660
        conn.proc.kill(a, grace=0)
        conn.proc.wait(a, timeout=30)
    assert wait_until(lambda: not endpoint.exists())  # unbound and removed at reap


def test_suspend_stops_the_agent_and_resume_continues_it(kernel: KernelProcess) -> None:
    with kernel.connect() as conn:
        a = conn.proc.spawn(agent("ticker"), name="ticker")
        assert wait_until(lambda: ticks(conn, a) >= 3)
        assert kernel.cli("suspend", str(a)).returncode == 0
        assert conn.proc.info(a).state == "suspended"
        time.sleep(0.1)
        frozen = ticks(conn, a)
        time.sleep(0.4)
        assert ticks(conn, a) == frozen
        with pytest.raises(sdk.SyscallError) as info:
            conn.proc.suspend(a)
        assert info.value.code.name == "EBUSY"
        assert kernel.cli("resume", str(a)).returncode == 0
        assert wait_until(lambda: ticks(conn, a) > frozen + 3)
        conn.proc.suspend(a)  # killing a suspended agent still ends it
        conn.proc.kill(a, grace=2)
        info_ = conn.proc.wait(a, timeout=30)
    assert info_.state == "killed" and info_.exit_status == 128 + signal.SIGTERM
    events = [e["event"] for e in audit_events(kernel) if e["detail"].get("agent") == a]
    assert events.count("suspend") == 2 and "resume" in events


def test_paused_agents_get_no_batch_place() -> None:
    sched = FairShare()
    for i, who in enumerate(["agent:1", "agent:2", "agent:1", "agent:2"]):
        sched.submit(Job(i, who, float(i), 4, 8), float(i))
    plan = sched.schedule(10.0, 4)
    assert len(plan.run) == 4
    sched.paused.add("agent:1")
    plan = sched.schedule(11.0, 4)
    assert {j.agent for j in plan.run} == {"agent:2"}
    assert {j.agent for j in plan.preempt} == {"agent:1"}  # running ones leave the batch
    assert {j.agent for j in sched.waiting()} == {"agent:1"}
    sched.paused.discard("agent:1")
    assert len(sched.schedule(12.0, 4).run) == 4


def test_log_cap_on_a_chatty_agent(kernel: KernelProcess) -> None:
    with kernel.connect() as conn:
        a = conn.proc.spawn(agent("ticker"), name="chatty", limits={"log_bytes": 64})
        assert wait_until(lambda: conn.proc.info(a).log_dropped > 0)
        conn.proc.kill(a, grace=0)
        info = conn.proc.wait(a, timeout=30)
    assert (kernel.state_dir / "agents" / str(a) / "stdout").stat().st_size == 64
    assert info.log_dropped > 0
    capped = [e for e in audit_events(kernel) if e["event"] == "log-capped"
              and e["detail"]["agent"] == a]
    assert capped and capped[0]["detail"]["dropped"] == info.log_dropped


def _restart_kernel(fresh_kernel: KernelProcess, tmp_path: Path) -> KernelProcess:
    config = tmp_path / "agentos.toml"
    config.write_text("[kernel]\nrestart_backoff = 0.05\nrestart_max = 3\n")
    fresh_kernel.extra_args = ["--config", str(config)]
    return fresh_kernel.start()


def test_on_failure_restarts_with_backoff_until_the_crash_loop_cap(
        fresh_kernel: KernelProcess, tmp_path: Path) -> None:
    k = _restart_kernel(fresh_kernel, tmp_path)
    with k.connect() as conn:
        ok = conn.proc.spawn(agent("exits"), argv=["0"], restart="on-failure", name="fine")
        bad = conn.proc.spawn(agent("exits"), argv=["3"], restart="on-failure", name="crashy")
        assert conn.proc.wait(ok, timeout=30).restarts == 0
        info = conn.proc.wait(bad, timeout=60)  # waits through the restarts
    assert info.state == "failed" and info.exit_status == 3 and info.restarts == 3
    events = [e for e in audit_events(k) if e["detail"].get("agent") == bad]
    assert [e["event"] for e in events].count("restart") == 3
    assert any(e["event"] == "crash-loop" for e in events)
    # The backoff doubles (the kernel's own record of each wait), and no restart came early.
    waits = [e["detail"]["restart_in"] for e in events if e["event"] == "exit"]
    assert waits == [0.05, 0.1, 0.2, None]
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(events)
            if a["event"] == "exit" and b["event"] == "spawn"]
    assert len(gaps) == 3 and all(gap >= wait * 0.9 for gap, wait in zip(gaps, waits[:3],
                                                                     strict=True))


def test_a_restart_whose_code_is_gone_fails_once_instead_of_crash_looping(
        fresh_kernel: KernelProcess, tmp_path: Path) -> None:
    """Every start checks the code: a restart whose file was removed (or sits in a home locked
    since its owner ended) ends the agent as `failed` with ENOENT, not restart_max crashes."""
    k = _restart_kernel(fresh_kernel, tmp_path)
    code = tmp_path / "gone.py"
    code.write_text("import sys\nfrom sdk import Agent\n\nclass Gone(Agent):\n"
                    "    def run(self, task):\n        print('ready', flush=True)\n"
                    "        self.ipc.recv()\n        sys.exit(3)\n")
    code.chmod(0o644)
    tmp_path.chmod(0o755)
    with k.connect() as conn:
        bad = conn.proc.spawn(str(code), restart="on-failure", name="gone")
        assert wait_until(lambda: conn.proc.logs(bad).data == b"ready\n", 30)
        code.unlink()
        conn.ipc.send("gone", "fail now")
        info = conn.proc.wait(bad, timeout=60)
    assert info.state == "failed" and info.restarts == 1, info
    refused = [e for e in audit_events(k) if e["event"] == "spawn-failed"
               and e["detail"].get("agent") == bad]
    assert refused and "code is gone" in refused[0]["detail"]["error"], refused


def test_kernels_side_by_side_never_share_an_agent_uid(tmp_path: Path) -> None:
    """A reap kills every process of the agent's uid, so a uid is one kernel's from its
    allocation until the agent is over: while kernel A's agent waits out a restart backoff
    (no process of its uid exists), kernel B with the same uid range must not take its uid."""
    if TEST_TIER == "none":
        pytest.skip("agents have no uids of their own in tier none")
    config = tmp_path / "agentos.toml"
    base = 6_000_000 + os.getpid() % 10_000 * 100
    config.write_text(f"[kernel]\nagent_uid_base = {base}\nagent_uid_count = 50\n"
                      "restart_backoff = 30\n")
    a, b = (KernelProcess(tmp_path / name / "state") for name in ("a", "b"))
    try:
        for k in (a, b):
            (k.state_dir.parent).mkdir()
            k.extra_args = ["--config", str(config)]
            k.start()
        with a.connect() as conn:
            first = conn.proc.spawn(agent("exits"), argv=["3"], restart="on-failure")
            assert wait_until(lambda: conn.proc.info(first).state == "restarting", 30)
            held = conn.proc.info(first).uid
        with b.connect() as conn:
            other = conn.proc.spawn(agent("idle"))
            assert wait_until(lambda: conn.proc.info(other).state == "running", 30)
            theirs = conn.proc.info(other).uid
        assert first == other and held == base + first  # same id, same range: same first pick
        assert theirs != held
    finally:
        for k in (a, b):
            if k.proc is not None and k.proc.poll() is None:
                k.stop()


def test_always_restarts_and_survives_a_kernel_crash(fresh_kernel: KernelProcess,
                                                      tmp_path: Path) -> None:
    k = _restart_kernel(fresh_kernel, tmp_path)
    with k.connect() as conn:
        a = conn.proc.spawn(agent("ticker"), restart="always", name="svc")
        lost = conn.proc.spawn(agent("ticker"), name="plain")
        assert wait_until(lambda: ticks(conn, a) >= 2 and ticks(conn, lost) >= 2)
        first_pid = conn.proc.info(a).pid
    k.stop(signal.SIGKILL)
    db = sqlite3.connect(k.state_dir / "kernel.db")
    assert db.execute("SELECT restart FROM agents WHERE id=?", (a,)).fetchone() == ("always",)
    db.close()
    homes = {i: k.state_dir / "agents" / str(i) / "home" for i in (a, lost)}
    quota = TEST_TIER != "none"  # sandboxed homes have a quota: a filesystem of their own
    if quota:  # the dead kernel left them mounted
        assert all(os.path.ismount(h) for h in homes.values())
    k.start()  # reconcile: the `always` agent comes back under its id, the other is lost
    with k.connect() as conn:
        assert wait_until(lambda: conn.proc.info(a).state == "running"
                          and conn.proc.info(a).pid != first_pid)
        assert conn.proc.info(a).restarts == 1
        assert conn.proc.info(lost).state == "lost"
        if quota:  # the lost one's unmounted and locked to root, the restarted one's mounted
            assert os.path.ismount(homes[a]) and not os.path.ismount(homes[lost])
            assert (homes[lost].stat().st_uid, homes[lost].stat().st_mode & 0o777) == (0, 0o700)
        conn.proc.kill(a, grace=0)  # killed on purpose: not restarted
        assert conn.proc.wait(a, timeout=30).state == "killed"
        time.sleep(0.3)
        assert conn.proc.info(a).state == "killed"


def test_death_cancels_calls_and_frees_llm_requests_within_a_second(
        tmp_path: Path, tiny_dir: Path) -> None:
    k = KernelProcess(tmp_path / "state")
    k.extra_args = ["--model", f"tiny={tiny_dir}", "--preload"]
    k.start()
    try:
        with k.connect() as conn:
            blocker = conn.proc.spawn(agent("blocker"), name="blocked")
            talker = conn.proc.spawn(agent("longchat"), caps=["llm.chat"], name="talker")
            assert wait_until(lambda: conn.proc.logs(talker).data == b"streaming\n", 60)
            assert wait_until(lambda: conn.proc.logs(blocker).data == b"blocking\n")
            assert wait_until(lambda: conn.sys.stats().calls_parked >= 2)
            assert wait_until(lambda: conn.sys.stats().models["tiny"]["generations"] >= 1)
            pids = [conn.proc.info(a).pid for a in (blocker, talker)]
            killed_at = time.time()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            # Observed from here, on a loaded machine this polling adds its own delay...
            assert wait_until(lambda: conn.sys.stats().calls_parked == 0, timeout=5.0)
            assert wait_until(lambda: conn.sys.stats().models["tiny"]["generations"] == 0,
                              timeout=5.0)
            assert conn.sys.null() is None
    finally:
        k.stop()
    # ...so the bound is checked on the kernel's own record: it reaped each agent, cancelling
    # its parked calls (the llm.chat one tells the model's worker to drop the generation) in
    # the same loop iteration, within a second of the kill.
    reaped = {e["detail"]["agent"]: e["ts"] for e in audit_events(k) if e["event"] == "exit"}
    assert all(reaped[a] - killed_at < 1.0 for a in (blocker, talker)), reaped



@sandboxed
def test_agents_cannot_start_weaker_or_larger_children(kernel: KernelProcess) -> None:
    # Fresh names: the admin's own `exits` is not the nested agent's to reuse (names.py).
    tries = [
        {"path": agent("exits"), "sandbox": "none", "name": "weak"},  # a weaker tier
        {"path": agent("exits"), "limits": {"open_files": 100000}, "name": "large"},  # more
        {"path": str(kernel.state_dir / "secret.key")},  # code it cannot read
        {"path": agent("exits"), "limits": {"open_files": 32}, "name": "tight"},  # fine
        {"path": agent("exits"), "limits": {"nice": 5}, "name": "n5"},  # ahead of nice 7
        {"path": agent("exits"), "limits": {"nice": 9}, "name": "n9"},  # behind it: fine
    ]
    with kernel.connect() as conn:
        a = conn.proc.spawn(agent("nested"), argv=[json.dumps(tries)], caps=["proc.spawn"],
                            limits={"nice": 7})
        said = conn.proc.wait(a, timeout=60).result
    assert said[:3] == ["EPERM", "EPERM", "EPERM"] and said[3].startswith("spawned"), said
    assert said[4] == "EPERM" and said[5].startswith("spawned"), said


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@sandboxed
def test_agents_run_behind_the_kernel_on_the_cpu(kernel: KernelProcess) -> None:
    """Agents get nice 5 by default (the kernel serving everyone keeps the CPU when it is
    contended), `--limit nice=N` within 0..19 moves one further back, never ahead."""
    with kernel.connect() as conn:
        default = conn.proc.spawn(agent("idle"), name="nice-default")
        later = conn.proc.spawn(agent("idle"), name="nice-12", limits={"nice": 12})
        for bad in (-1, 20):
            with pytest.raises(sdk.SyscallError) as err:
                conn.proc.spawn(agent("idle"), limits={"nice": bad})
            assert err.value.code == abi.ErrorCode.EINVAL
        try:
            assert wait_until(lambda: conn.proc.info(later).state == "running")
            assert wait_until(lambda: all(
                nice_of(conn.proc.info(a).pid) != os.getpriority(os.PRIO_PROCESS, 0)
                for a in (default, later)))
            assert nice_of(conn.proc.info(default).pid) == 5
            assert nice_of(conn.proc.info(later).pid) == 12
        finally:
            conn.proc.kill(default)
            conn.proc.kill(later)


@sandboxed
def test_a_stray_agent_range_uid_is_refused_and_audited() -> None:
    base = Path(tempfile.mkdtemp(prefix="agentos-stray-"))
    base.chmod(0o711)  # the stray process must reach the endpoint to be judged by the kernel
    kernel = KernelProcess(base / "state").start()
    try:
        _stray(kernel)
    finally:
        kernel.stop()
        shutil.rmtree(base, ignore_errors=True)


STRAY = """
import importlib, os, pkgutil, sys
import sdk
for m in pkgutil.iter_modules(sdk.__path__):  # the stray uid cannot read the stdlib's dir
    importlib.import_module("sdk." + m.name)
endpoint, token, gid, uid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
try:
    with sdk.Connection(endpoint, token, timeout=1.0) as c:
        c.sys.null()
except sdk.SyscallError:
    sys.exit(0)
sys.exit(1)
"""


def _stray(kernel: KernelProcess) -> None:
    with kernel.connect() as conn:
        a = conn.proc.spawn(agent("blocker"), name="owner")
        assert wait_until(lambda: conn.proc.logs(a).data == b"blocking\n")
        gid = conn.proc.info(a).uid
        endpoint = f"ipc://{kernel.state_dir}/run/agents/{a}/kernel.sock"
        token = os.environ.get("AGENTOS_TOKEN", "x")
        stray = 200000 + 65000  # in the agent range, belonging to no running agent
        # A fresh interpreter, not a fork of this one: a fork of a process with threads (zmq's,
        # the model's) can inherit a lock held mid-operation and hang (it did, once, in CI).
        # It imports as root, then drops to the stray uid before its first zmq context.
        child = subprocess.run(
            [sys.executable, "-c", STRAY, endpoint, token, str(gid), str(stray)],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert child.returncode == 0, (child.returncode, child.stderr)
        assert conn.sys.null() is None
        conn.proc.kill(a, grace=0)
        conn.proc.wait(a, timeout=30)
    assert wait_until(lambda: any(
        e["event"] == "deny" and e["principal"] == f"uid:{stray}"
        and e["detail"]["call"] == "connect" for e in audit_events(kernel)))


def test_cli_run_takes_restart_and_limits(kernel: KernelProcess) -> None:
    out = kernel.cli("run", "--restart", "on-failure", "--limit", "open_files=32",
                     "--limit", "log_bytes=1K", "--name", "clirun", agent("exits"), "--", "0")
    assert out.returncode == 0, out.stderr
    agent_id = int(out.stdout)
    with kernel.connect() as conn:
        info = conn.proc.wait(agent_id, timeout=30)
    assert info.restart == "on-failure" and info.exit_status == 0 and info.restarts == 0
    bad = kernel.cli("run", "--limit", "open_files", agent("exits"))
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr
    unknown = kernel.cli("run", "--limit", "cores=2", agent("exits"))
    assert unknown.returncode == 1 and "EINVAL" in unknown.stderr
