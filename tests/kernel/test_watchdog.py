"""The watchdog for real: a dispatch loop wedged in a handler stops its WATCHDOG=1 pings, a
stand-in for systemd (Type=notify, WatchdogSec=) sees them stop, aborts the kernel and starts
it again, and the new kernel reconciles the agents by their restart policies."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import sdk
from tests.conftest import KernelProcess, agent, wait_until

WATCHDOG_S = 1.0  # WatchdogSec= of the stand-in supervisor


class Supervisor:
    """The part of systemd this is about: it listens on $NOTIFY_SOCKET and notes each
    datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.heard: list[tuple[float, str]] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}

    def listen(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            self.heard.append((time.monotonic(), data.decode()))

    def expect(self, field: str, timeout: float) -> float:
        """When a datagram holding `field` arrives (after those already heard)."""
        start = len(self.heard)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.listen(min(0.1, end - time.monotonic()))
            for when, msg in self.heard[start:]:
                if field in msg.split("\n"):
                    return when
        raise AssertionError(f"no {field} within {timeout} s; heard {self.heard[start:]}")

    def last_pet(self) -> float:
        return max(when for when, msg in self.heard if msg == "WATCHDOG=1")

    def watch(self, pid: int, timeout: float) -> float:
        """systemd's watchdog: once no ping came for WatchdogSec, SIGABRT the main pid (its
        WatchdogSignal=); when it did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.listen(0.05)
            if time.monotonic() - self.last_pet() > WATCHDOG_S:
                os.kill(pid, signal.SIGABRT)
                return time.monotonic()
        raise AssertionError("the kernel kept pinging")

    def close(self) -> None:
        self.sock.close()


def _diary(conn: sdk.Connection, agent_id: int, start: int) -> dict | None:
    for line in conn.proc.logs(agent_id).data.decode().splitlines():
        record = json.loads(line)
        if record["fs"].endswith(f"start {start}\n"):
            return record
    return None


def test_a_wedged_loop_is_aborted_restarted_and_its_agents_reconciled(
        fresh_kernel: KernelProcess, tmp_path: Path) -> None:
    k, wedge = fresh_kernel, tmp_path / "wedge"
    supervisor = Supervisor(tmp_path / "notify")
    k.module = "tests.wedging_kernel"
    # PYTHONFAULTHANDLER=1 as in the unit: the abort writes every thread's stack to the log.
    k.env.update({**supervisor.env(), "AGENTOS_WEDGE": str(wedge), "PYTHONFAULTHANDLER": "1"})
    try:
        k.start(wait=False)
        supervisor.expect("READY=1", 20)
        with k.connect() as conn:
            diarist = conn.proc.spawn(agent("diarist"), restart="always", name="diarist")
            assert wait_until(lambda: _diary(conn, diarist, 1) is not None, 20)
            first_pid = conn.proc.info(diarist).pid
        # Healthy and idle, the loop pings every WatchdogSec/2 on its own.
        since = time.monotonic()
        supervisor.listen(1.2)
        pets = [when for when, msg in supervisor.heard if msg == "WATCHDOG=1" and when > since]
        assert len(pets) >= 2 and max(b - a for a, b in itertools.pairwise(pets)) < WATCHDOG_S

        wedge.touch()
        wedged_at = time.monotonic()

        def ping() -> None:  # the call whose handler wedges the loop; it never gets an answer
            try:
                with k.connect(timeout=3) as client:
                    client.sys.null()
            except sdk.SyscallError:
                pass

        threading.Thread(target=ping, daemon=True).start()
        fired = supervisor.watch(k.proc.pid, timeout=10)
        assert supervisor.last_pet() < wedged_at + WATCHDOG_S / 2 + 0.2  # the pings stopped
        assert fired - wedged_at < WATCHDOG_S * 2  # and were missed within WatchdogSec
        assert k.proc.wait(10) == -signal.SIGABRT
        log = k.log()
        assert "wedging the dispatch loop" in log and "_wedging_null" in log  # where it hung

        assert not wedge.exists()  # one wedge: the next kernel serves
        k.stop()  # closes its log file; the process is gone already
        k.start(wait=False)  # Restart=on-failure
        supervisor.expect("READY=1", 20)
        supervisor.expect("WATCHDOG=1", 2 * WATCHDOG_S)
        with k.connect() as conn:
            assert wait_until(lambda: _diary(conn, diarist, 2) is not None, 20)
            info = conn.proc.info(diarist)
            assert info.state == "running" and info.pid != first_pid and info.restarts == 1
            # Its state came through: the file the kernel stores, and its own home.
            diary = _diary(conn, diarist, 2)
            assert diary == {"fs": "start 1\nstart 2\n", "home": "start 1\nstart 2\n"}
            conn.proc.kill(diarist, grace=0)
            assert conn.proc.wait(diarist, timeout=30).state == "killed"
    finally:
        supervisor.close()
