"""The syscall rings inside the real kernel: the same results as ZeroMQ, hostile and killed
agents, and rings that go with their agent (streaming over a ring: tests/kernel/llm/test_llm.py)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from tests.conftest import ROOT, KernelProcess, agent, wait_until


@pytest.fixture(scope="module")
def rk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path_factory.mktemp("rings") / "state").start()
    yield k
    assert k.stop() == 0


def ring_maps(pid: int) -> list[str]:
    """The kernel's mappings of ring segments (memfds never have a path of their own)."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "memfd:agentos-" in line]


def ring_fds(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if "memfd:agentos-" in str(target):
            out.append(str(target))
    return out


def run_agent(conn: sdk.Connection, name: str, *argv: str, caps: list[str] | None = None,
              timeout: float = 60) -> sdk.AgentInfo:
    agent_id = conn.proc.spawn(agent(name), name=f"{name}-{argv[0] if argv else 'x'}",
                               argv=list(argv), caps=caps or [])
    info = conn.proc.wait(agent_id, timeout=timeout)
    assert info.exit_status == 0, conn.proc.logs(agent_id, stream="stderr").data.decode()
    return info


def test_ring_and_zeromq_paths_give_identical_results(rk: KernelProcess) -> None:
    with rk.connect() as conn:
        ring = run_agent(conn, "ringcheck", "ring", caps=["ipc.send@ipc/ringcheck-ring"]).result
        zmq = run_agent(conn, "ringcheck", "zmq", caps=["ipc.send@ipc/ringcheck-zmq"]).result
    assert ring["rings"] is True and zmq["rings"] is False
    assert ring["results"] == zmq["results"]
    got = ring["results"]
    assert got["recv"] == ["ok", {"n": 1}] and got["recv_big"] == ["ok", True]
    assert got["kill_denied"] == ["error", "EPERM"] and got["no_syscall"] == ["error", "ENOSYS"]
    assert got["bad_args"] == ["error", "EINVAL"] and got["recv_empty"] == ["error", "ETIMEDOUT"]
    assert got["batch"] == [["ok", None], ["ok", True], ["error", "EPERM"], ["error", "ENOSYS"],
                            ["ok", None], ["ok", True]]
    assert got["child_env"] == "None" and got["batch_overflow"] == 300
    assert got["rings_by_ticket"] == ["error", "EPERM"]
    # Every call but the two oversized sends took the ring, and so did the stats call that read
    # the count afterwards; the ZeroMQ-only agent put nothing there. (One call per key but
    # child_env and the batches, plus the first batch's six.)
    assert ring["entries"] == (len(got) - 3) - 1 + 1 + (6 - 1) and zmq["entries"] == 0


def test_rings_are_closed_when_their_agent_is_reaped(rk: KernelProcess) -> None:
    with rk.connect() as conn:
        pid = conn.sys.stats().pid
        assert wait_until(lambda: conn.sys.stats().agents_running == 0)
        assert ring_maps(pid) == [] and ring_fds(pid) == []
        agent_id = conn.proc.spawn(agent("idle"), name="ringidle", argv=["30"])
        assert len(ring_maps(pid)) == 2  # its submission and completion segments
        # No fd: the fds passed to the agent are closed once it runs, and the mappings hold
        # none (kernel/doors/ring.py map_shared; Python's mmap of an fd keeps a dup).
        assert ring_fds(pid) == []
        conn.proc.kill(agent_id, grace=0)
        conn.proc.wait(agent_id, timeout=10)
        assert ring_maps(pid) == [] and ring_fds(pid) == []


def test_hostile_ring_is_quarantined_while_a_good_agent_is_served(rk: KernelProcess) -> None:
    with rk.connect() as conn:
        before = conn.sys.stats().syscalls.get("ring.quarantined", 0)
        hostile = conn.proc.spawn(agent("ringhostile"), name="hostile", argv=["3", "256", "2048"])
        good = conn.proc.spawn(agent("ringburst"), name="goodburst")
        time.sleep(0.5)
        # A well-behaved agent doing blocking calls beside it: every one succeeds.
        info = run_agent(conn, "ringcheck", "ring", caps=["ipc.send@ipc/ringcheck-ring"])
        assert info.result["rings"] and info.result["results"]["null"] == ["ok", None]
        assert wait_until(
            lambda: conn.sys.stats().syscalls.get("ring.quarantined", 0) == before + 1, 20)
        assert any(k.startswith("ring.") for k in conn.sys.stats().errors)
        assert conn.proc.info(good).state == "running"  # the burst agent is unharmed
        conn.proc.kill(good, grace=0)
        assert conn.proc.wait(hostile, timeout=30).exit_status == 0  # it ran to its end
        conn.proc.wait(good, timeout=10)
        conn.sys.null()


def test_agent_killed_mid_burst_leaves_the_kernel_serving(rk: KernelProcess) -> None:
    with rk.connect() as conn:
        pid = conn.sys.stats().pid
        for round_ in range(3):
            before = conn.sys.stats().syscalls.get("ring.entries", 0)
            agent_id = conn.proc.spawn(agent("ringburst"), name=f"burst{round_}")
            assert wait_until(
                lambda b=before: conn.sys.stats().syscalls.get("ring.entries", 0) > b + 1000)
            conn.proc.kill(agent_id, grace=0)  # SIGKILL, mid-burst
            info = conn.proc.wait(agent_id, timeout=10)
            assert info.exit_status == 128 + signal.SIGKILL
        assert ring_maps(pid) == []
        assert run_agent(conn, "ringcheck", "ring",
                         caps=["ipc.send@ipc/ringcheck-ring"]).result["rings"]


def test_restarted_kernel_makes_fresh_rings(fresh_kernel: KernelProcess) -> None:
    fresh_kernel.start()
    with fresh_kernel.connect() as conn:
        old = conn.proc.spawn(agent("idle"), name="old", argv=["60"])
        old_pid = conn.proc.info(old).pid
    fresh_kernel.stop(signal.SIGKILL)
    fresh_kernel.start()  # crash-only recovery kills the agent and its rings go with it
    with fresh_kernel.connect() as conn:
        assert conn.proc.info(old).state == "lost"
        assert wait_until(lambda: not Path(f"/proc/{old_pid}").exists()
                          or "Z" in Path(f"/proc/{old_pid}/stat").read_text().split(")")[1][:3])
        pid = conn.sys.stats().pid
        assert ring_maps(pid) == []
        info = run_agent(conn, "ringcheck", "ring", caps=["ipc.send@ipc/ringcheck-ring"])
        assert info.result["rings"] and info.result["results"]["null"] == ["ok", None]
        assert ring_maps(pid) == []


def test_kernel_polls_busy_rings_instead_of_waiting_for_doorbells(rk: KernelProcess) -> None:
    """Back-to-back calls find the loop polling the agent's ring (SQPOLL): the agent skips the
    doorbell, so far fewer doorbell rounds than entries."""
    with rk.connect() as conn:
        got = run_agent(conn, "ringpoll", "400").result
    assert got["rings"] is True
    assert got["ring.entries"] >= 400 + 1  # the calls and the closing sys.stats
    assert got["ring.polled"] > 0
    assert got["ring.doorbells"] < got["ring.entries"] / 2, got


def test_polling_off_still_serves_rings(fresh_kernel: KernelProcess, tmp_path: Path) -> None:
    config = tmp_path / "kernel.toml"
    config.write_text("[kernel]\nring_poll_us = 0\n")
    fresh_kernel.extra_args = ["--config", str(config)]
    fresh_kernel.start()
    with fresh_kernel.connect() as conn:
        got = run_agent(conn, "ringpoll", "100").result
    assert got["rings"] is True and got["ring.polled"] == 0
    assert got["ring.doorbells"] >= 100
    assert fresh_kernel.stop() == 0


def kernel_memfds(k: KernelProcess) -> int:
    assert k.proc is not None
    return len(ring_fds(k.proc.pid))


def test_a_process_that_connects_on_its_own_gets_rings_by_ticket(rk: KernelProcess) -> None:
    base = kernel_memfds(rk)
    with sdk.connect(state_dir=rk.state_dir, rings=True) as conn:
        assert conn.uses_rings
        assert kernel_memfds(rk) > base  # its two segments' fds
        before = conn.sys.stats().syscalls
        assert conn.sys.null() is None
        with pytest.raises(sdk.SyscallError) as err:
            conn.proc.info(10**9)
        assert err.value.code.name == "ENOENT"
        with conn.batch() as b:
            many = [b.sys.null() for _ in range(100)]
        assert all(p.result() is None for p in many)
        after = conn.sys.stats().syscalls
        assert after["ring.entries"] - before.get("ring.entries", 0) == 1 + 1 + 100 + 1
        assert after["ring.user_attached"] >= 1
    # Closing the connection closes its lifeline: the kernel lets go of the rings.
    assert wait_until(lambda: kernel_memfds(rk) == base)


def test_rings_of_a_killed_process_are_closed(rk: KernelProcess) -> None:
    base = kernel_memfds(rk)
    code = ("import sys, time, sdk\n"
            f"conn = sdk.connect(state_dir={str(rk.state_dir)!r}, rings=True)\n"
            "conn.sys.null(); print(conn.uses_rings, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "True"
        assert kernel_memfds(rk) > base  # its two segments' fds
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: kernel_memfds(rk) == base)


def test_ring_tickets_are_one_time_and_checked(rk: KernelProcess) -> None:
    from sdk import abi, ringpath

    path = str(rk.state_dir / "run" / "rings.sock")
    with rk.connect() as conn:
        bad_before = conn.sys.stats().errors.get("ring.bad_ticket", 0)
        # A made-up ticket: the kernel hangs up without sending anything.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(path)
            raw.sendall(b"0" * 32 + b"\n")
            msg, fds, _, _ = socket.recv_fds(raw, 1024, 4)
        assert msg == b"" and fds == []
        ticket = conn.call("sys.rings", None, abi.RingTicket)
        assert ticket.path == path
        channel = ringpath.attach_ticket(ticket.path, ticket.ticket, iter(range(1, 10**9)))
        try:
            with pytest.raises(ringpath.RingError):  # spent
                ringpath.attach_ticket(ticket.path, ticket.ticket, iter(range(1, 10**9)))
        finally:
            channel.close()
        assert conn.sys.stats().errors.get("ring.bad_ticket", 0) == bad_before + 2
