"""The signal helper: every process of an agent's uid is signalled without forking the kernel."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import pytest

from kernel.proc import sandbox, signaller
from tests.conftest import wait_until
from tests.kernel.proc.test_sandbox import IS_ROOT, uid_for, uid_processes

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="identity not available: tests are not "
                                "root, so there is no other uid to signal")


def start_as(uid: int) -> list[subprocess.Popen[bytes]]:
    """Processes of `uid`: one in a session of its own, and one that double-forks a child into
    another session (which no process group of the first reaches)."""
    procs = [subprocess.Popen(["sleep", "300"], user=uid, group=uid, extra_groups=[],
                              start_new_session=True),
             subprocess.Popen(["sh", "-c", "setsid sleep 301 & exec sleep 302"], user=uid,
                              group=uid, extra_groups=[], start_new_session=True)]
    assert wait_until(lambda: len(uid_processes(uid)) == 3)
    return procs


def reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


@pytest.fixture
def helper(monkeypatch: pytest.MonkeyPatch) -> signaller.Signaller:
    fresh = signaller.Signaller()
    monkeypatch.setattr(signaller, "HELPER", fresh)
    yield fresh
    fresh.close()


def test_kill_uid_reaches_every_process_of_the_uid_without_forking_the_caller(
        helper: signaller.Signaller, monkeypatch: pytest.MonkeyPatch) -> None:
    # Forking the kernel (gigabytes of model) to signal a uid was the cost being removed: the
    # caller must not fork at all. A neighbour's uid keeps its processes.
    agent, neighbour = uid_for(40), uid_for(41)
    procs = start_as(agent) + start_as(neighbour)
    try:
        def no_fork() -> int:
            raise AssertionError("kill_uid forked the calling process")

        monkeypatch.setattr(os, "fork", no_fork)
        sandbox.kill_uid(agent)
        assert wait_until(lambda: not uid_processes(agent))
        assert len(uid_processes(neighbour)) == 3
        assert helper.starts == 1
        sandbox.kill_uid(neighbour, signal.SIGTERM)  # another signal, the same helper
        assert wait_until(lambda: not uid_processes(neighbour))
        assert helper.starts == 1
    finally:
        monkeypatch.undo()
        sandbox.kill_uid(agent)
        sandbox.kill_uid(neighbour)
        reap(procs)


def test_a_helper_that_died_is_started_again(helper: signaller.Signaller,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    uid = uid_for(42)
    assert helper.request(uid, signal.SIGKILL) == 0  # nothing of the uid runs: still fine
    assert helper.popen is not None
    helper.popen.kill()
    helper.popen.wait()
    monkeypatch.setattr(signaller, "RESTART_AFTER_S", 0.0)  # it died at once: a crash loop
    procs = start_as(uid)
    try:
        assert helper.signal_uid(uid, signal.SIGKILL)
        assert wait_until(lambda: not uid_processes(uid))
        assert helper.starts == 2
    finally:
        sandbox.kill_uid(uid)
        reap(procs)


def test_without_a_helper_kill_uid_forks_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    broken = signaller.Signaller(python="/nonexistent/python3")
    monkeypatch.setattr(signaller, "HELPER", broken)
    uid = uid_for(43)
    procs = start_as(uid)
    try:
        with caplog.at_level(logging.WARNING, logger="kernel.proc"):
            sandbox.kill_uid(uid)
        assert wait_until(lambda: not uid_processes(uid))
        assert "signal helper failed" in caplog.text
        assert broken.starts == 0
        assert broken.request(uid, signal.SIGKILL) is None  # not retried straight away
    finally:
        reap(procs)


def test_the_helper_refuses_root_and_malformed_requests(helper: signaller.Signaller) -> None:
    assert helper.request(0, signal.SIGKILL) == 1  # EPERM: never every process of root's
    assert helper.request(uid_for(44), 0) == 1  # not a signal to send
    assert helper.request(uid_for(44), signal.NSIG) == 1
    assert helper.sock is not None
    helper.sock.send(b"\x00" * 3)
    assert signaller.REPLY.unpack(helper.sock.recv(64)) == (22,)  # EINVAL
    assert helper.request(uid_for(44), signal.SIGKILL) == 0  # and it still serves
    assert helper.starts == 1
