"""Hostile agents run by the real kernel, each beside a well-behaved one: every attempt fails or
is contained, the kernel records what it can see in the audit log, the neighbour keeps working.

What the kernel cannot see (a syscall seccomp refused inside the agent) shows in the agent's
own report; what it can (a stolen token, a capped log, an agent killed by a limit) is audited."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import stat
import subprocess
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
from tests.conftest import AGENTS, TESTS, KernelProcess, agent, agent_token, wait_until
from tests.kernel.proc.test_sandbox import sdk_python
from tests.kernel.proc.test_sandbox_hostile import host_sysv_objects

HOSTILE = TESTS / "hostile"
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
        # a 0700 directory (a pyenv in /root) cannot run as an agent's uid, so the kernel is
        # given one that can (`agent_python`).
        if tier == "standard" and sdk_python() is None:
            tiers.append(pytest.param(tier, marks=pytest.mark.skip(
                reason="standard tier: no Python with the SDK's dependencies is reachable by "
                       "agent uids")))
            continue
        tiers.append(tier)
    return tiers


TIERS = _tiers()
# A uid range of this suite's own, for its kernels' config.
OWN_UIDS = f"agent_uid_base = {5_000_000 + os.getpid() % 10_000 * 1000}\n"


@pytest.fixture(scope="module")
def hk() -> Iterator[KernelProcess]:
    # Not under pytest's 0700 tmp dirs: agents of their own uids must pass through to their
    # homes in the standard tier.
    base = Path(tempfile.mkdtemp(prefix="agentos-hk-"))
    base.chmod(0o711)
    k = KernelProcess(base / "state")
    # A uid range of its own: kernels of other suites on this host must not share a uid with
    # its agents (a reap kills every process of the agent's uid).
    config = f"[kernel]\n{OWN_UIDS}"
    python = sdk_python() if "standard" in TIERS else None
    if python not in (None, sys.executable):
        config += f'agent_python = "{python}"\n'
    (base / "agentos.toml").write_text(config)
    k.extra_args = ["--config", str(base / "agentos.toml")]
    k.start()
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
        stolen = agent_token(vinfo.pid)  # a token that leaked somehow
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
        # While the victim runs: its home is unmounted (and locked to root) once it ends.
        assert (home / "notes").read_text() == "private" and not (home / "pwned").exists()
        conn.proc.kill(victim, grace=0)
        conn.proc.wait(victim, timeout=30)
    # Strict shows a skeleton of the directories above its own binds, and nothing else.
    seen = out.pop("list_state")
    assert isinstance(seen, str) or not {"secret.key", "kernel.db", "admin.token"} & set(seen)
    failed = {name: result for name, result in out.items() if result is not None}
    assert failed == out, f"attacks that worked: {set(out) - set(failed)}"
    # TCP: seccomp (EPERM), or, where the agent has the kernel's HTTP door relayed into its
    # netns, Landlock allows connecting to the relay's port only (EACCES).
    assert out["tcp_connect"] in ("EPERM", "EACCES") and out["ptrace_kernel"] == "EPERM"
    assert out["stolen_token"] == "EPERM"
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
        assert wait_until(lambda: conn.proc.logs(parent).data.endswith(b"swapped\n"), 30)
        conn.ipc.send(child_name, "fail now")  # its first run ends; the policy restarts it
        info = conn.proc.wait(child, timeout=60)
        conn.ipc.send(f"swapper-{tier}", "bye")
        assert conn.proc.wait(parent, timeout=60).result == "swapped"
        assert_steady_ok(conn, good)
        stdout = conn.proc.logs(child).data
    assert info.state == "failed" and info.restarts == 1, info
    assert stdout == b"ready\n", stdout  # no run after the swap
    refused = [e for e in audit(hk) if e["event"] == "spawn-failed"
               and e["detail"]["agent"] == child]
    assert refused and "reached through a symlink" in refused[0]["detail"]["error"], refused


def home_of(k: KernelProcess, agent_id: int) -> Path:
    return k.state_dir / "agents" / str(agent_id) / "home"


@pytest.mark.parametrize("tier", TIERS)
def test_a_home_has_a_quota_and_is_locked_when_its_agent_ends(hk: KernelProcess,
                                                              tier: str) -> None:
    """Issue 15 #7: 3 GB went into a home without refusal, and the agent left it 0777 after
    it. The filler stops at its quota with ENOSPC; a neighbour writing its own home and one
    making syscalls carry on; the kernel answers; both homes end root's, 0700, unmounted."""
    with hk.connect() as conn:
        calm = steady(conn, tier, f"calm-{tier}")
        tidy = conn.proc.spawn(str(HOSTILE / "fill.py"), argv=[str(4 << 20)], sandbox=tier,
                               name=f"tidy-{tier}")
        filler = conn.proc.spawn(str(HOSTILE / "fill.py"), argv=[str(64 << 20)], sandbox=tier,
                                 limits={"home_bytes": 16 << 20}, name=f"filler-{tier}")
        for agent_id in (tidy, filler):
            info = conn.proc.wait(agent_id, timeout=60)
            assert info.exit_status == 0, conn.proc.logs(agent_id, "stderr").data
        assert_steady_ok(conn, calm)
        assert conn.sys.null() is None
        filled, neighbour = last_json(conn, filler), last_json(conn, tidy)
        with pytest.raises(sdk.InvalidArgument):  # 0 (no quota) or a size ext4 can hold
            conn.proc.spawn(agent("exits"), sandbox=tier, limits={"home_bytes": 4096})
    assert filled["error"] == "ENOSPC" and 8 << 20 <= filled["written"] < 16 << 20, filled
    assert neighbour == {"written": 4 << 20, "error": None, "mode": "0o777"}
    assert filled["mode"] == "0o777"  # both opened their homes to every uid...
    for agent_id, quota in ((filler, 16 << 20), (tidy, 1 << 30)):
        home = home_of(hk, agent_id)
        st = home.lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)  # ...not now
        assert not os.path.ismount(home)
        image = home.parent / "home.img"
        assert image.stat().st_size == quota and image.stat().st_blocks * 512 <= 17 << 20


@pytest.mark.parametrize("tier", TIERS)
def test_sysv_objects_of_an_agent_uid_go_at_its_reap(hk: KernelProcess, tier: str) -> None:
    """Issue 15 #4: an agent left 3 x 300 MB SysV segments that outlived it. The sandbox
    refuses SysV IPC (tests/kernel/proc/test_sandbox_hostile.py); should objects of the agent's
    uid be in the host's namespace anyway, the reap removes them, counts them and audits it."""
    with hk.connect() as conn:
        victim = conn.proc.spawn(agent("blocker"), sandbox=tier, name=f"sysv-{tier}")
        assert wait_until(lambda: conn.proc.logs(victim).data == b"blocking\n")
        uid = conn.proc.info(victim).uid
        make_sysv_objects(uid)
        assert len(host_sysv_objects(uid)) == 3
        good = steady(conn, tier, f"sysv-neighbour-{tier}")
        conn.proc.kill(victim, grace=0)
        conn.proc.wait(victim, timeout=30)
        assert_steady_ok(conn, good)
    assert host_sysv_objects(uid) == []
    removed = [e["detail"] for e in audit(hk) if e["event"] == "sysv-removed"
               and e["detail"]["agent"] == victim]
    assert removed == [{"agent": victim, "uid": uid, "shm": 1, "msg": 1, "sem": 1}]


def make_sysv_objects(uid: int) -> None:
    """A segment, a queue and a semaphore set created by `uid` in the host's IPC namespace
    (a process of the agent's uid outside its sandbox)."""
    pid = os.fork()
    if pid == 0:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            ok = (libc.shmget(0, 1 << 20, 0o1600) >= 0 and libc.msgget(0, 0o1600) >= 0
                  and libc.semget(0, 1, 0o1600) >= 0)
            os._exit(0 if ok else 1)
        finally:
            os._exit(2)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_home_at_exit_remove_deletes_a_home_once_its_agent_is_over() -> None:
    """`home_at_exit = "remove"`: a home lives across its agent's restarts (even one under
    another uid, its last still busy on the host) and a kernel's clean stop (the next kernel
    restarts the agent), and goes when the agent is over."""
    base = Path(tempfile.mkdtemp(prefix="agentos-hk-rm-"))
    base.chmod(0o711)
    config = base / "agentos.toml"
    config.write_text('[kernel]\nhome_at_exit = "remove"\nhome_bytes = 8388608\n'
                      f"restart_backoff = 2.0\n{OWN_UIDS}")
    k = KernelProcess(base / "state")
    k.extra_args = ["--config", str(config)]
    squatter = None
    try:
        k.start()
        with k.connect() as conn:
            again = conn.proc.spawn(agent("remembers"), restart="on-failure")
            assert wait_until(lambda: conn.proc.info(again).state == "restarting")
            first_uid = conn.proc.info(again).uid
            # Its uid is busy when it restarts: it runs under another, and must still find
            # the file its first run left.
            squatter = subprocess.Popen(["/bin/sleep", "60"], user=first_uid, group=first_uid,
                                        extra_groups=[], start_new_session=True)
            info = conn.proc.wait(again, timeout=60)
            assert info.exit_status == 0 and info.restarts == 1, (
                info, conn.proc.logs(again, "stderr").data[-1000:])
            assert info.uid != first_uid
            assert b'{"found": "first run"}' in conn.proc.logs(again).data
            stays = conn.proc.spawn(agent("blocker"), restart="always")
            assert wait_until(lambda: conn.proc.logs(stays).data == b"blocking\n")
        assert not home_of(k, again).exists()
        assert not (home_of(k, again).parent / "home.img").exists()
        assert (home_of(k, again).parent / "stdout").exists()  # the logs are the kernel's
        (home_of(k, stays) / "notes").write_text("kept for the next kernel")
        k.stop()  # `always`: the next kernel starts it again, with its home
        assert (home_of(k, stays).parent / "home.img").exists()
        k.start()
        with k.connect() as conn:
            assert wait_until(lambda: conn.proc.info(stays).state == "running")
            assert (home_of(k, stays) / "notes").read_text() == "kept for the next kernel"
            conn.proc.kill(stays, grace=0)
            conn.proc.wait(stays, timeout=30)
        assert not home_of(k, stays).exists()
    finally:
        if squatter is not None:
            squatter.kill()
            squatter.wait()
        if k.proc is not None and k.proc.poll() is None:
            k.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_home_over_a_lowered_quota_is_refused_with_equota() -> None:
    """A kernel restarted with a smaller `home_bytes` than what an agent's home holds refuses
    to restart that agent (EQUOTA, audited) rather than lose its files."""
    base = Path(tempfile.mkdtemp(prefix="agentos-hk-q-"))
    base.chmod(0o711)
    config = base / "agentos.toml"
    config.write_text(f"[kernel]\nhome_bytes = 16777216\n{OWN_UIDS}")
    k = KernelProcess(base / "state")
    k.extra_args = ["--config", str(config)]
    try:
        k.start()
        with k.connect() as conn:
            stays = conn.proc.spawn(agent("blocker"), restart="always")
            assert wait_until(lambda: conn.proc.logs(stays).data == b"blocking\n")
        (home_of(k, stays) / "data").write_bytes(b"x" * (6 << 20))
        k.stop()
        config.write_text(f"[kernel]\nhome_bytes = 4194304\n{OWN_UIDS}")
        k.start()
        with k.connect() as conn:
            assert wait_until(lambda: conn.proc.info(stays).state == "failed")
        failed = [e["detail"]["error"] for e in audit(k) if e["event"] == "spawn-failed"]
        assert "holds more than its new quota" in failed[-1], failed
        image = home_of(k, stays).parent / "home.img"
        assert image.stat().st_size == 16 << 20  # untouched: its files are all there
    finally:
        if k.proc is not None and k.proc.poll() is None:
            k.stop()
        shutil.rmtree(base, ignore_errors=True)
