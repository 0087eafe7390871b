"""Dependencies that die: an MCP server that crashes mid-call, is killed while idle, or hangs.
The caller gets a typed error within its deadline, the mount is restarted with backoff
(`tools.mounts` shows `restarting` and the count), and its neighbours keep serving."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

import sdk
from tests.conftest import TESTS, KernelProcess, wait_until

DYING = TESTS / "mcp_dying.py"
STEADY = TESTS / "mcp_server.py"


@pytest.fixture(scope="module")
def mk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path_factory.mktemp("deps") / "state").start()
    yield k
    k.stop()


def _mount(conn: sdk.Connection, name: str) -> dict:
    return {m.name: m for m in conn.tools.mounts()}[name]


def _ready_again(conn: sdk.Connection, name: str, restarts: int, timeout: float = 60) -> None:
    """Wait for the mount's `restarts`-th restart to be serving."""
    assert wait_until(lambda: (_mount(conn, name).state, _mount(conn, name).restarts) == (
        "ready", restarts), timeout=timeout, interval=0.1), _mount(conn, name)


def test_mcp_server_dying_mid_call_is_eio_then_eagain_then_restarted(mk: KernelProcess) -> None:
    with mk.connect(timeout=60) as conn:
        conn.tools.mount("dy", [sys.executable, str(DYING)])
        conn.tools.mount("steady", [sys.executable, str(STEADY)])
        first = conn.tools.call("dy.pid").value["result"]
        started = time.monotonic()
        with pytest.raises(sdk.KernelFault, match="exited during the call"):
            conn.tools.call("dy.die", timeout=30)
        assert time.monotonic() - started < 5  # the death is noticed, not waited out
        # Its neighbours never noticed.
        assert conn.tools.call("steady.add", a=2, b=3).value == {"result": 5}
        conn.sys.null()
        # Until it is back, its calls are refused as retryable, never hung.
        try:
            conn.tools.call("dy.add", a=1, b=1, timeout=10)
        except sdk.TryAgain:
            assert _mount(conn, "dy").state in ("ready", "restarting")
        _ready_again(conn, "dy", 1)
        assert conn.tools.call("dy.add", a=1, b=1).value == {"result": 2}
        assert conn.tools.call("dy.pid").value["result"] != first
        events = [r.event for r in conn.audit.read(limit=10_000)]
        assert "tool-restart" in events
        conn.tools.unmount("dy")
        conn.tools.unmount("steady")


def test_mcp_server_killed_while_idle_is_noticed_and_restarted(mk: KernelProcess) -> None:
    with mk.connect(timeout=60) as conn:
        conn.tools.mount("idle", [sys.executable, str(DYING)])
        pid = conn.tools.call("idle.pid").value["result"]
        os.kill(pid, signal.SIGKILL)
        # No call needed: the mount's watch sees the server gone and restarts it.
        _ready_again(conn, "idle", 1)
        assert conn.tools.call("idle.pid").value["result"] != pid
        conn.tools.unmount("idle")


def test_mcp_server_that_keeps_dying_backs_off(mk: KernelProcess) -> None:
    with mk.connect(timeout=60) as conn:
        conn.tools.mount("loop", [sys.executable, str(DYING)])
        for n in (1, 2):  # in a row: the second restart waits twice as long as the first
            with pytest.raises(sdk.KernelFault):
                conn.tools.call("loop.die", timeout=30)
            _ready_again(conn, "loop", n)
        conn.tools.unmount("loop")
        assert "loop" not in [m.name for m in conn.tools.mounts()]


def test_mcp_server_that_hangs_is_etimedout_and_the_mount_serves_on(mk: KernelProcess) -> None:
    with mk.connect(timeout=60) as conn:
        conn.tools.mount("slow", [sys.executable, str(DYING)])
        started = time.monotonic()
        with pytest.raises(sdk.TimedOut):
            conn.tools.call("slow.wedge", seconds=60, timeout=1.0)
        assert time.monotonic() - started < 5
        conn.sys.null()
        conn.tools.unmount("slow")
