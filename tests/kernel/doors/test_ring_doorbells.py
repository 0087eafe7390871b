"""Doorbells skipped while the other side polls (the POLLING flag), the kernel's spin advice,
and the sleep protocol that keeps a skipped doorbell from ever being a lost wakeup."""

from __future__ import annotations

import os
import random
import select
import threading
import time
from collections.abc import Iterator

import pytest

from kernel.doors.ring import RingPair
from sdk.ring import AgentRings, fence


@pytest.fixture
def rings() -> Iterator[tuple[RingPair, AgentRings]]:
    pair = RingPair.create(capacity=8, slot_size=64)
    agent = AgentRings.attach(pair.spec())  # same process: the fds are valid here too
    yield pair, agent
    agent.close()
    pair.close()


def doorbell_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_agent_skips_the_doorbell_only_while_the_kernel_polls(rings) -> None:
    pair, agent = rings
    assert agent.submit([b"a"]) == 1 and pair.acknowledge() == 1
    pair.submissions.set_polling(True)
    assert agent.submissions.push(b"b") and agent.ring_doorbell() is False
    assert pair.acknowledge() == 0 and pair.submissions.pending()
    assert pair.drain()[0] == [b"a", b"b"] and not pair.submissions.pending()
    pair.submissions.set_polling(False)
    assert agent.submissions.push(b"c") and agent.ring_doorbell() is True
    assert pair.acknowledge() == 1


def test_kernel_skips_the_completion_doorbell_only_while_the_agent_looks(rings) -> None:
    pair, agent = rings
    fd = agent.completion_doorbell
    agent.completions.set_polling(True)
    assert pair.complete([b"x"]) == 1 and doorbell_count(fd) == 0
    agent.completions.set_polling(False)
    assert pair.complete([b"y"]) == 1 and doorbell_count(fd) == 1
    assert agent.completions.pop_many(8) == [b"x", b"y"]


def test_a_lying_flag_costs_only_the_liar(rings) -> None:
    """The kernel reads the agent's flag word only to decide whether to ring: garbage there
    means 'ring me' (only exactly POLLING means 'don't')."""
    pair, agent = rings
    agent._maps[1][68:72] = b"\xff\xff\xff\xff"
    assert pair.complete([b"x"]) == 1 and doorbell_count(agent.completion_doorbell) == 1


def test_spin_follows_the_kernels_advice(rings) -> None:
    pair, agent = rings
    started = time.monotonic()
    assert agent.spin(5.0, 5.0) is False  # advice 0 (a fresh ring): no spinning at all
    assert time.monotonic() - started < 1.0

    pair.completions.advise(2_000_000)  # up to 2 s
    publisher = threading.Timer(0.02, lambda: pair.complete([b"late"]))
    publisher.start()
    started = time.monotonic()
    assert agent.spin(5.0) is True  # found by looking, before any doorbell wait
    assert time.monotonic() - started < 1.5
    publisher.join()
    assert agent.completions.pop_many(8) == [b"late"]
    # The flag is down again: the next completion rings.
    doorbell_count(agent.completion_doorbell)
    assert pair.complete([b"next"]) == 1 and doorbell_count(agent.completion_doorbell) == 1


def _sleep_until(pending, set_polling, fd: int, spin_s: float) -> bool:
    """One side's wait, as the kernel and the SDK do it: look a while with the flag up, then
    flag down, fence, look again, and only then sleep on the doorbell. False if a wakeup was
    lost: an entry is there and its doorbell never rang. A slow peer (a loaded machine) is
    waited for; 60 s without an entry only ends a stuck run."""
    if spin_s:
        set_polling(True)
        end = time.perf_counter() + spin_s
        while not pending() and time.perf_counter() < end:
            pass
        set_polling(False)
    fence()
    give_up = time.monotonic() + 60
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    while not pending():
        if poll.poll(500):
            doorbell_count(fd)
        elif pending():
            # Published but not rung yet: the producer may be between the two. It must ring
            # (our flag is down), so a doorbell still missing after 10 s was lost.
            return bool(poll.poll(10_000)) and doorbell_count(fd) > 0
        elif time.monotonic() > give_up:
            return False
    return True


def test_no_wakeup_is_lost_between_two_processes() -> None:
    """Ping-pong across a fork: the agent pushes, the kernel side answers, each side waiting
    with a random spin then the sleep protocol. A lost doorbell stalls a side into its
    timeout, which ends the run on both sides."""
    rounds = 2000
    pair = RingPair.create(capacity=4, slot_size=64)
    agent = AgentRings.attach(pair.spec())
    pid = os.fork()
    if pid == 0:  # the kernel's side
        code = 0
        try:
            rng = random.Random(1)
            sq = pair.submissions
            for _ in range(rounds):
                if not _sleep_until(sq.pending, sq.set_polling, pair.submission_doorbell,
                                    rng.choice((0, 0, 5e-6, 5e-5))):
                    code = 3
                    break
                payloads, faults = pair.drain(4)
                if faults or len(payloads) != 1:
                    code = 4
                    break
                pair.complete(payloads)
        except BaseException:
            code = 5
        os._exit(code)
    lost = 0
    try:
        rng = random.Random(2)
        cq = agent.completions
        for i in range(rounds):
            assert agent.submit([i.to_bytes(4, "little")]) == 1
            if not _sleep_until(cq.pending, cq.set_polling, agent.completion_doorbell,
                                rng.choice((0, 0, 5e-6, 5e-5))):
                lost += 1
                break
            assert cq.pop_many(4) == [i.to_bytes(4, "little")]
    finally:
        _, status = os.waitpid(pid, 0)
        agent.close()
        pair.close()
    assert lost == 0
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_kernel_bug_on_one_ring_closes_that_ring_not_the_kernel(tmp_path, monkeypatch) -> None:
    """The loop's last line of defence for rings: an exception while serving one ring's
    entries (here: an injected one) is logged and closes that ring; the loop goes on."""
    import signal

    import msgspec

    from kernel.config import Config
    from kernel.core import Kernel
    from sdk.ring import RingSpec

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    k = Kernel(Config(state_dir=tmp_path / "state", models={}, memory_embedder="none"))
    k.boot()
    try:
        monkeypatch.setattr(k.procs, "is_live", lambda agent_id: True)
        made = k.rings.create(7)
        assert made is not None
        agent = AgentRings.attach(msgspec.json.decode(made[1], type=RingSpec))

        def broken(*_: object) -> bool:
            raise RuntimeError("injected")

        monkeypatch.setattr(k.rings._by_agent[7].pair, "drain", broken)
        assert agent.submit([b"anything"]) == 1
        k.step(0)  # must not raise
        assert k.calls.errors["ring.internal"] == 1 and k.rings._by_agent == {}
        k.step(0)
        agent.close()
    finally:
        k._shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
