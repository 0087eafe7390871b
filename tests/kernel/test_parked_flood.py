"""Parked calls cannot freeze the kernel: each principal's calls in flight are capped (EAGAIN
beyond) at the one place every door goes through, cancelling one is O(1), and a dead agent's
are cancelled a slice per loop iteration, so its neighbours' calls never wait behind them."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.call import Call, Caller
from kernel.config import Config
from kernel.db import Database
from kernel.ipc import Mailboxes
from kernel.switchboard import CANCEL_SLICE, Switchboard
from sdk import abi
from tests.conftest import TESTS, KernelProcess, agent, wait_until

HOSTILE = TESTS / "hostile"


def test_cancelling_parked_calls_is_constant_time(tmp_path: Path) -> None:
    """100k recvs parked in a real Mailboxes on the real switchboard, no kernel around them:
    half time out one by one newest first (the worst order for a list), the rest are cancelled
    when the agent is reaped, a slice per loop iteration; their deadline timers leave the heap
    as they go."""
    config = Config(state_dir=tmp_path / "state")
    calls = Switchboard(agent_cap=1 << 20, user_cap=1 << 20)
    ipc = Mailboxes(calls=calls, config=config, db=Database(tmp_path / "kernel.db"), procs=None)
    me = Caller("agent:7", 7)
    parked = [Call(b"route", i, "ipc.recv", me) for i in range(100_000)]
    start = time.monotonic()
    for call in parked:
        ipc.recv(call, abi.RecvArgs(timeout_ms=3_600_000))
    assert calls.parked("agent:7") == len(parked)
    for call in reversed(parked[50_000:]):
        calls.fail(call, abi.ErrorCode.ETIMEDOUT, "timed out")
    assert calls.find_parked(b"route", 49_999) is parked[49_999]
    ipc.forget_waiters(7)  # what the kernel does when agent 7 is reaped
    calls.cancel_of("agent:7", "agent 7 has ended")
    assert calls.parked() == 0  # out of the count at once; failed in slices below
    iterations = 0
    while (cancelled := calls.errors["ECANCELED"]) < 50_000:
        time.sleep(1e-6)  # the next iteration: the slice's timer is due
        calls.run_timers()
        assert 0 < calls.errors["ECANCELED"] - cancelled <= CANCEL_SLICE
        iterations += 1
    elapsed = time.monotonic() - start
    assert iterations >= 50_000 // CANCEL_SLICE and all(c.done for c in parked)
    assert calls.find_parked(b"route", 49_999) is None
    assert calls.timers_pending() < 1000  # cancelled deadlines do not stay in the heap
    print(f"\n100k parked, 50k timed out, 50k cancelled at reap: {elapsed:.3f} s")
    assert elapsed < 5.0  # about 1 s on a loaded 2-core box; hours with lists
    calls.close()


@pytest.fixture(scope="module")
def pk() -> Iterator[KernelProcess]:
    base = Path(tempfile.mkdtemp(prefix="agentos-pk-"))
    base.chmod(0o711)
    k = KernelProcess(base / "state").start()
    yield k
    k.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(900)
def test_hostile_parker_is_capped_and_its_reap_does_not_stall_a_neighbour(
        pk: KernelProcess) -> None:
    """The attack of issue 15: an agent with default rights parks calls by the 100k and ends.
    Beside it a neighbour calls sys.null every 20 ms. While the parker floods, the kernel is
    busy with its (refused) calls and the neighbour shares a loaded box with them: its median
    stays low, its tail gets a generous bound. From the flood's end, through the reap and 8 s
    on its p99 stays under 50 ms (before the fix the reap of 100k parked calls stalled the loop
    for about a minute; the 8 s leave room for the ~0.1 s any reap costs on a loaded box)."""
    tries = 100_000
    with pk.connect(timeout=600) as conn:
        # niced: the kernel's discipline is measured here, not the host's CPU scheduler
        bad = conn.proc.spawn(str(HOSTILE / "parker.py"), argv=[str(tries), "4"], name="parker",
                              limits={"nice": 19})
        good = conn.proc.spawn(agent("pinger"), argv=["20"], name="pinger")
        assert wait_until(lambda: conn.proc.logs(good).data.startswith(b"measuring"), 60)
        conn.ipc.send("parker", "go")
        assert wait_until(lambda: conn.proc.logs(bad).data.strip() != b"", timeout=600), \
            conn.proc.logs(bad, "stderr").data.decode()
        report = json.loads(conn.proc.logs(bad).data.splitlines()[-1])
        conn.ipc.send("pinger", "next")  # the flood is over; its calls stay parked
        parked = conn.sys.stats().calls_parked
        begun = time.monotonic()
        conn.proc.kill(bad, grace=0)
        conn.proc.wait(bad, timeout=600)
        assert wait_until(lambda: conn.sys.stats().calls_parked == 0, timeout=600)
        reaped_s = time.monotonic() - begun
        time.sleep(8.0)  # the neighbour measures on past the reap
        conn.ipc.send("pinger", "stop")
        flood, reap = conn.proc.wait(good, timeout=60).result
    print(f"\nneighbour during the flood: {flood}\nthrough the reap: {reap}\n"
          f"parker: {report}; kill to all cancelled: {reaped_s:.3f} s")
    assert reap["p99_ms"] < 50, (reap, reaped_s)
    assert flood["p50_ms"] < 50 and flood["p99_ms"] < 1000, flood
    cap = Config().agent_calls_in_flight
    assert report["codes"] == {"EAGAIN": tries - cap}, report
    assert parked == cap
