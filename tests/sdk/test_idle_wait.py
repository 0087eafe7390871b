"""An agent blocked in a call sleeps: its reader wakes for a message, its deadline, a thread
that wants the socket, or once a second — not every 50 ms (at 1,400 idle agents those wakeups
alone kept both cores of the 2-core VM busy)."""

from __future__ import annotations

import time
from pathlib import Path

import sdk
from tests.conftest import agent, wait_until


def _switches(pid: int) -> int:
    """Voluntary context switches of the process's main thread: one per wakeup from a poll."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_an_agent_blocked_in_a_call_wakes_at_most_about_once_a_second(
        admin: sdk.Connection) -> None:
    agent_id = admin.proc.spawn(agent("blocker"), name="sleeps-in-recv")
    try:
        assert wait_until(lambda: b"blocking" in admin.proc.logs(agent_id).data)
        pid = admin.proc.info(agent_id).pid
        time.sleep(0.5)  # into its wait
        before = _switches(pid)
        time.sleep(3)
        woke = _switches(pid) - before
        # About 3 (one per second); the old 50 ms slice gave ~60.
        assert woke <= 12, woke
    finally:
        admin.proc.kill(agent_id, grace=0)
        admin.proc.wait(agent_id, timeout=30)


def test_a_thread_sharing_the_connection_is_not_held_by_a_blocked_reader(
        admin: sdk.Connection) -> None:
    """One thread blocked in a 3 s call holds the reader's poll; another thread's calls on the
    same connection nudge it out each time, so they go through while the first still waits
    (without the nudge each would wait for the reader's one-second poll)."""
    import threading

    agent_id = admin.proc.spawn(agent("blocker"), name="never-exits")
    done = threading.Event()

    def blocked() -> None:
        try:
            admin.proc.wait(agent_id, timeout=3)  # parked in the kernel for 3 s
        except sdk.SyscallError:
            pass
        done.set()

    try:
        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.3)  # the first thread is in its poll now
        calls = 0
        while not done.is_set() and calls < 50:
            admin.sys.null()
            calls += 1
        assert calls == 50 and not done.is_set(), calls
        thread.join()
    finally:
        admin.proc.kill(agent_id, grace=0)
        admin.proc.wait(agent_id, timeout=30)
