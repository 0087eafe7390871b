"""Host-wide uid leases (kernel/proc/uids.py): a uid is one kernel's until it lets go, a dead
kernel's leases go with it, and a kernel holds all its leases on one fd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kernel.proc.uids import UidLeases
from tests.conftest import ROOT


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_two_kernels_never_hold_one_uid_and_a_release_frees_it(tmp_path: Path) -> None:
    lock = tmp_path / "uids.lock"
    a, b = UidLeases(lock), UidLeases(lock)  # two opens: two kernels' lock owners
    assert a.take(7000, "agent-1") and a.take(7000, "agent-1")  # again for its owner: a restart
    assert not a.take(7000, "agent-2")  # this kernel's, for another owner
    assert not b.take(7000, "agent-9")  # the other kernel's
    assert b.take(7001, "agent-9") and not a.take(7001, "agent-3")
    assert a.take(7002, "agent-1")  # an owner moves to another uid: its old one is free
    assert not a.held(7000) and a.held(7002) and b.take(7000, "agent-8")
    a.release("agent-1")
    assert b.take(7002, "agent-7")
    b.close()
    assert a.take(7000, "x") and a.take(7001, "y") and a.take(7002, "z")
    a.close()


def test_every_lease_of_a_kernel_shares_one_fd(tmp_path: Path) -> None:
    leases = UidLeases(tmp_path / "uids.lock")
    before = open_fds()
    assert all(leases.take(8000 + i, i) for i in range(200))
    assert len(leases) == 200 and open_fds() == before + 1
    leases.close()
    assert open_fds() == before


def test_a_dead_kernels_leases_die_with_it(tmp_path: Path) -> None:
    lock = tmp_path / "uids.lock"
    code = ("import sys, time\nfrom kernel.proc.uids import UidLeases\n"
            f"leases = UidLeases(__import__('pathlib').Path({str(lock)!r}))\n"
            "assert leases.take(9000, 'a')\nprint('held', flush=True)\ntime.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        mine = UidLeases(lock)
        assert not mine.take(9000, "b")
    finally:
        other.kill()
        other.wait()
    assert mine.take(9000, "b")
    mine.close()
