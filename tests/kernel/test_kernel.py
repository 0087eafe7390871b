"""Syscalls through a real kernel process, real sockets and real agent processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import msgspec
import pytest
import zmq

import sdk
from sdk import abi
from tests.conftest import ROOT, KernelProcess, agent, agent_token, wait_until


def _audit(kernel: KernelProcess, event: str) -> list[tuple]:
    db = sqlite3.connect(kernel.state_dir / "kernel.db")
    try:
        return db.execute("SELECT principal, detail FROM audit WHERE event=?", (event,)).fetchall()
    finally:
        db.close()


def test_null_and_stats(admin: sdk.Connection) -> None:
    assert admin.sys.null() is None
    stats = admin.sys.stats()
    assert stats.abi == sdk.ABI_VERSION and stats.pid > 0 and stats.syscalls["sys.null"] >= 1


def test_hello_agent_runs_and_reports_its_result(admin: sdk.Connection) -> None:
    agent_id = admin.proc.spawn(str(ROOT / "userland/agents/hello.py"), name="hello-test",
                                argv=["greet"])
    info = admin.proc.wait(agent_id, timeout=30)
    assert info.state == "exited" and info.exit_status == 0
    assert info.result["task"] == "greet" and info.result["agent"] == agent_id
    assert info.result["ipc_send_without_capability"].endswith("(EPERM)")
    out = admin.proc.logs(agent_id, "stdout")
    assert b"hello from agent" in out.data and out.eof


def test_exit_statuses(admin: sdk.Connection) -> None:
    failing = admin.proc.spawn(agent("fails"))
    plain = admin.proc.spawn(agent("exits"), argv=["3"])
    info = admin.proc.wait(failing, timeout=30)
    assert info.state == "exited" and info.exit_status == 1
    assert b"fails on purpose" in admin.proc.logs(failing, "stderr").data
    assert admin.proc.wait(plain, timeout=30).exit_status == 3


def test_an_agent_finished_off_after_proc_exit_exited_cleanly(fresh_kernel: KernelProcess,
                                                             tmp_path: Path) -> None:
    """It declared itself done; the kernel's SIGKILL after the grace is cleanup, not failure.
    (A kernel of its own with a short grace: the default 5 s would only be waited out.)"""
    config = tmp_path / "kernel.toml"
    config.write_text("[kernel]\nkill_grace = 1.0\n")
    fresh_kernel.extra_args = ["--config", str(config)]
    fresh_kernel.start()
    with fresh_kernel.connect() as admin:
        info = admin.proc.wait(admin.proc.spawn(agent("lingers")), timeout=60)
        assert (info.state, info.exit_status, info.result) == ("exited", 0, {"done": True})
        rows, since = [], 0
        while batch := admin.audit.read(since=since):
            rows, since = rows + batch, batch[-1].seq
    assert any(r.event == "finished-off" and r.detail.get("agent") == info.id
               and r.detail.get("grace") == 1.0 for r in rows)


def test_async_agent(admin: sdk.Connection) -> None:
    info = admin.proc.wait(admin.proc.spawn(agent("aio"), name="aio"), timeout=30)
    assert info.exit_status == 0, admin.proc.logs(info.id, "stderr").data
    assert info.result == {"nulls": 50, "abi": sdk.ABI_VERSION, "me": "aio"}


def test_ipc_needs_a_capability_naming_the_receiver(admin: sdk.Connection) -> None:
    bob = admin.proc.spawn(agent("echo"), name="bob", argv=["20"])
    wait_until(lambda: admin.proc.info(bob).state == "running")
    denied = admin.proc.spawn(agent("sender"), name="mallory", argv=["bob", "x"])
    assert admin.proc.wait(denied, timeout=30).exit_status == 1
    assert b"PermissionDenied" in admin.proc.logs(denied, "stderr").data
    alice = admin.proc.spawn(agent("sender"), name="alice", argv=["bob", "hello bob"],
                             caps=["ipc.send@ipc/bob"])
    assert admin.proc.wait(alice, timeout=30).result == "sent"
    got = admin.proc.wait(bob, timeout=30)
    assert got.result == {"from": f"agent:{alice}", "data": "hello bob"}


def test_ipc_recv_times_out_and_send_to_nobody_is_enoent(admin: sdk.Connection) -> None:
    quiet = admin.proc.spawn(agent("echo"), name="quiet", argv=["0.2"])
    info = admin.proc.wait(quiet, timeout=30)
    assert info.exit_status == 1
    assert b"TimedOut" in admin.proc.logs(quiet, "stderr").data
    with pytest.raises(sdk.NotFound):
        admin.ipc.send("no-such-agent", 1)


def test_stolen_tokens_are_refused(kernel: KernelProcess, admin: sdk.Connection) -> None:
    victim = admin.proc.spawn(agent("blocker"), name="victim")
    assert wait_until(lambda: admin.proc.logs(victim).data == b"blocking\n")
    victim_token = agent_token(admin.proc.info(victim).pid).encode()
    admin_token = (kernel.state_dir / "admin.token").read_text().strip()
    for stolen in (victim_token.decode(), admin_token):
        thief = admin.proc.spawn(agent("thief"), name="thief", argv=[stolen])
        result = admin.proc.wait(thief, timeout=30).result
        assert result["null"] == "EPERM" and "audience" in result["message"]
    admin.proc.kill(victim, grace=0)
    denials = [d for p, d in _audit(kernel, "deny") if "audience" in d]
    assert len(denials) >= 2


def test_forged_and_truncated_tokens_are_refused(kernel: KernelProcess) -> None:
    token = (kernel.state_dir / "admin.token").read_text().strip()
    endpoint = f"ipc://{kernel.state_dir}/run/kernel.sock"
    forged = [token[:-1] + ("A" if token[-1] != "A" else "B"), token[: len(token) // 2], "",
              "aos1.AAAA", token + "x"]
    for bad in forged:
        with sdk.Connection(endpoint, bad) as conn, pytest.raises(sdk.PermissionDenied):
            conn.sys.null()
    assert any("invalid token" in d for _, d in _audit(kernel, "deny"))


def test_bad_calls_get_typed_errors(admin: sdk.Connection) -> None:
    with pytest.raises(sdk.NoSuchSyscall):
        admin.call("sys.nonesuch")
    with pytest.raises(sdk.InvalidArgument):
        admin.call("proc.info", abi.LogsArgs(id=1, stream="stderr"))  # wrong argument struct
    with pytest.raises(sdk.InvalidArgument):
        admin.proc.spawn("relative/path.py")
    with pytest.raises(sdk.NotFound):
        admin.proc.spawn("/nonexistent/agent.py")
    with pytest.raises(sdk.NotFound):
        admin.proc.info(10**9)
    with pytest.raises(sdk.InvalidArgument):
        admin.proc.spawn(agent("echo"), caps=["not a rule"])
    with pytest.raises(sdk.InvalidArgument):
        admin.proc.spawn(agent("echo"), caps=["nosuch.call"])
    with pytest.raises(sdk.InvalidArgument):
        admin.proc.exit("users are not agents")


def test_duplicate_running_name_is_ebusy(admin: sdk.Connection) -> None:
    first = admin.proc.spawn(agent("blocker"), name="solo")
    with pytest.raises(sdk.Busy):
        admin.proc.spawn(agent("blocker"), name="solo")
    admin.proc.kill(first, grace=0)
    assert admin.proc.wait(first, timeout=30).state == "killed"


def test_agents_cannot_grant_rights_they_lack(admin: sdk.Connection) -> None:
    # The spawner may spawn, but holds no ipc rights, so it cannot hand any out.
    spawner = admin.proc.spawn(agent("spawner"), name="spawner",
                               argv=[agent("echo"), "ipc.send@ipc/bob"], caps=["proc.spawn"])
    assert admin.proc.wait(spawner, timeout=30).result == "EPERM"


def test_wait_timeout_is_etimedout(admin: sdk.Connection) -> None:
    blocker = admin.proc.spawn(agent("blocker"), name="waited")
    with pytest.raises(sdk.TimedOut):
        admin.proc.wait(blocker, timeout=0.2)
    admin.proc.kill(blocker, grace=0)


def test_killing_an_agent_mid_syscall_cancels_its_call(admin: sdk.Connection) -> None:
    blocker = admin.proc.spawn(agent("blocker"), name="blocked")
    assert wait_until(lambda: admin.proc.logs(blocker).data == b"blocking\n")
    assert wait_until(lambda: admin.sys.stats().calls_parked >= 1)
    admin.proc.kill(blocker)  # SIGTERM
    info = admin.proc.wait(blocker, timeout=30)
    assert info.state == "killed" and info.exit_status == 128 + signal.SIGTERM
    assert wait_until(lambda: admin.sys.stats().calls_parked == 0)
    assert admin.sys.null() is None


def test_sigkill_of_a_flooding_agent_leaves_the_kernel_healthy(admin: sdk.Connection) -> None:
    flood = admin.proc.spawn(agent("flood"), name="flood")
    assert wait_until(lambda: admin.proc.logs(flood).data == b"flooding\n")

    def calls() -> float:  # the flooder's own count, whatever else runs on this kernel
        return admin.sys.stats().callers.get(f"agent:{flood}", {}).get("syscalls", 0)

    assert wait_until(lambda: calls() > 100, timeout=30)  # killed mid-flood, not before it
    os.kill(admin.proc.info(flood).pid, signal.SIGKILL)
    info = admin.proc.wait(flood, timeout=30)
    assert info.state == "killed" and info.exit_status == 128 + signal.SIGKILL
    for _ in range(20):
        admin.sys.null()


def test_unattested_peer_of_another_uid_is_refused(kernel: KernelProcess) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    endpoint = f"ipc://{kernel.state_dir}/run/kernel.sock"
    token = (kernel.state_dir / "admin.token").read_text().strip()
    pid = os.fork()
    if pid == 0:  # child: become nobody and try; exit 0 only if no reply ever came
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError:
            os._exit(2)
        # The run dir is 0700 root, so even the socket is out of reach; a client that could
        # reach it would still be refused at the ZAP handshake.
        try:
            with sdk.Connection(endpoint, token, timeout=1.0) as conn:
                conn.sys.null()
        except sdk.SyscallError:
            code = 0
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_raw_garbage_frames_get_einval(kernel: KernelProcess) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{kernel.state_dir}/run/kernel.sock")
    sock.rcvtimeo = 5000
    try:
        sock.send_multipart([b"two", b"frames"])
        err = abi.decode_response(sock.recv())
        assert isinstance(err, abi.Error) and err.code == abi.ErrorCode.EINVAL
        sock.send(abi.encode([abi.ABI_VERSION, 99, "sys.null"]))  # truncated envelope
        err = abi.decode_response(sock.recv())
        assert isinstance(err, abi.Error) and err.id == 99 and err.code == abi.ErrorCode.EINVAL
        raw = msgspec.Raw(abi.encode({}))
        sock.send(abi.encode(abi.Request(v=abi.ABI_VERSION, id=5, call="sys.null",
                                         token="bogus", args=raw)))
        err = abi.decode_response(sock.recv())
        assert isinstance(err, abi.Error) and err.code == abi.ErrorCode.EPERM
    finally:
        sock.close(linger=0)


def test_a_symlinked_log_cannot_leak_kernel_files(kernel: KernelProcess,
                                                   admin: sdk.Connection) -> None:
    done = admin.proc.spawn(agent("exits"))
    admin.proc.wait(done, timeout=30)
    log = kernel.state_dir / "agents" / str(done) / "stdout"
    log.unlink()
    log.symlink_to(kernel.state_dir / "secret.key")
    with pytest.raises(sdk.PermissionDenied):
        admin.proc.logs(done)
    assert (kernel.state_dir / "agents" / str(done) / "home").is_dir()


def test_accounts_forget_the_least_recently_active_caller() -> None:
    """Per-caller rows are bounded: past MAX_CALLERS the one idle longest goes."""
    from kernel import accounts
    from kernel.call import Call, Caller

    book = accounts.Accounts()
    for n in range(accounts.MAX_CALLERS):
        book.done(Call(b"r", n, "sys.null", Caller(f"user:{n}", None)), None)
    time.sleep(0.002)  # a later clock reading than any creation above
    book.done(Call(b"r", 0, "sys.null", Caller("user:0", None)), None)  # 0 is active again
    book.done(Call(b"r", 0, "sys.null", Caller("user:new", None)), None)
    assert len(book.callers) == accounts.MAX_CALLERS
    assert "user:new" in book.callers and "user:0" in book.callers
    assert "user:1" not in book.callers  # the least recently active
    assert book.callers["user:0"]["syscalls"] == 2
    assert sum(book.latency["sys"]) == accounts.MAX_CALLERS + 2
