"""Ring setup: private segments, names that do not outlive their use, agents attaching by fd
or by name from their own processes, and a close that leaves nothing behind."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from kernel.doors.ring import RingPair
from sdk.ring import AgentRings, RingError, RingSpec
from tests.conftest import ROOT

SHM = Path("/dev/shm")

# An agent process: attach from the spec on argv, push `n` entries in small batches, expect
# each one back with "echo:" in front, in order.
AGENT = r"""
import sys, time
import msgspec
from sdk.ring import AgentRings, RingSpec
spec = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=RingSpec)
n = int(sys.argv[2])
rings = AgentRings.attach(spec)
print("mapped", flush=True)
sent = [b"entry-%d" % i for i in range(n)]
got, i = [], 0
deadline = time.monotonic() + 20
while len(got) < n and time.monotonic() < deadline:
    if i < n:
        i += rings.submit(sent[i:i + 7])
    batch = rings.completions.pop_many(64)
    got += batch
    if not batch and len(got) < n:
        if spec.completion_doorbell is None:
            time.sleep(0.001)  # a named agent rings over ZeroMQ; here it simply polls
        else:
            rings.wait(1.0)
assert got == [b"echo:" + s for s in sent], got[:5]
rings.close()
print("done", flush=True)
"""


def _agent_names() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("agentos-")}


def _spawn_agent(pair: RingPair, n: int) -> subprocess.Popen[str]:
    spec = msgspec.msgpack.encode(pair.spec()).hex()
    proc = subprocess.Popen([sys.executable, "-c", AGENT, spec, str(n)], cwd=ROOT,
                            pass_fds=pair.fds() if not pair.named else (),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "mapped\n"
    return proc


def _serve_echo(pair: RingPair, proc: subprocess.Popen[str], timeout: float = 20) -> int:
    """The kernel's loop in miniature: wait on the doorbell, drain, answer through the CQ
    (holding back while the agent's CQ is full, where the kernel would use ZeroMQ)."""
    poller = select.poll()
    poller.register(pair.submission_doorbell, select.POLLIN)
    backlog: list[bytes] = []
    served = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if poller.poll(1 if pair.named else 100):
            pair.acknowledge()
        if backlog:
            del backlog[:pair.complete(backlog)]
            continue
        payloads, faults = pair.drain(16)
        assert faults == []
        served += len(payloads)
        backlog = [b"echo:" + p for p in payloads]
    return served


def test_spawned_agent_attaches_by_fd_and_exchanges_entries() -> None:
    before = _agent_names()
    with RingPair.create(capacity=8, slot_size=64) as pair:
        assert _agent_names() == before and pair.names == ()  # never named at all
        proc = _spawn_agent(pair, 300)
        assert _serve_echo(pair, proc) == 300
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and out == "done\n"
        assert not pair.quarantined


def test_named_agent_attaches_and_the_names_go_once_it_has_mapped() -> None:
    with RingPair.create(capacity=16, slot_size=64, named=True) as pair:
        assert len(pair.names) == 2 and all(n.lstrip("/") in _agent_names() for n in pair.names)
        proc = _spawn_agent(pair, 100)
        linked = [SHM / n.lstrip("/") for n in pair.names]
        pair.unlink()  # the agent reported "mapped"
        assert pair.names == () and not any(p.exists() for p in linked)
        with pytest.raises(RingError):
            pair.spec()
        assert _serve_echo(pair, proc) == 100
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and out == "done\n"


def test_named_segments_are_mode_0600_while_linked() -> None:
    with RingPair.create(capacity=4, slot_size=64, named=True) as pair:
        for name in pair.names:
            st = (SHM / name.lstrip("/")).stat()
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        spec = pair.spec()
        assert spec.submission_doorbell is None and spec.completion_doorbell is None


def test_fd_segments_are_private_sealed_memfds() -> None:
    with RingPair.create(capacity=4, slot_size=64) as pair:
        for fd in pair.fds()[:2]:
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:agentos-")
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
            assert not os.get_inheritable(fd)  # only pass_fds hands them on


@pytest.mark.skipif(os.geteuid() != 0, reason="fchown to another uid needs root")
@pytest.mark.parametrize("named", [False, True])
def test_segments_are_given_to_the_owner_uid(named: bool) -> None:
    with RingPair.create(capacity=4, slot_size=64, owner_uid=65534, named=named) as pair:
        for fd in pair.fds()[:2]:
            assert os.fstat(fd).st_uid == 65534
        for name in pair.names:
            assert (SHM / name.lstrip("/")).stat().st_uid == 65534


def test_close_leaves_nothing_in_dev_shm_and_no_fds() -> None:
    before = _agent_names()
    pair = RingPair.create(capacity=4, slot_size=64, named=True)
    assert len(_agent_names() - before) == 2
    fds = pair.fds()
    pair.close()
    pair.close()
    assert _agent_names() == before
    for fd in fds:
        with pytest.raises(OSError) as exc:
            os.fstat(fd)
        assert exc.value.errno == errno.EBADF
    for use in (lambda: pair.drain(1), pair.acknowledge, pair.notify, pair.fds,
                lambda: pair.completions.push(b"x")):
        with pytest.raises(RingError):
            use()


def test_agent_waits_for_the_completion_doorbell() -> None:
    with RingPair.create(capacity=4, slot_size=64) as pair:
        rings = AgentRings.attach(pair.spec())
        assert rings.wait(0.01) is False
        assert pair.complete([b"a", b"b"]) == 2
        assert rings.wait(0.01) is True
        assert rings.completions.pop_many(8) == [b"a", b"b"]
        assert rings.wait(0) is False
        rings.close()
    with RingPair.create(capacity=4, slot_size=64, named=True) as pair:
        rings = AgentRings.attach(pair.spec())
        with pytest.raises(RingError):
            rings.wait(0)
        rings.ring_doorbell()  # no eventfd: the agent rings over ZeroMQ instead
        rings.close()


def test_spec_is_validated_when_decoded() -> None:
    spec = RingSpec(capacity=8, slot_size=64, submission=3, completion=4)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=RingSpec) == spec
    bad = [{"capacity": 8, "slot_size": 64, "submission": "/etc/passwd", "completion": 4},
           {"capacity": 8, "slot_size": 64, "submission": -1, "completion": 4},
           {"capacity": 0, "slot_size": 64, "submission": 3, "completion": 4}]
    for fields in bad:
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=RingSpec)
    with pytest.raises(RingError):
        AgentRings.attach(RingSpec(capacity=8, slot_size=64,
                                   submission="/agentos-" + "0" * 32, completion=4))


def test_a_handed_over_pair_holds_only_its_doorbells() -> None:
    """The kernel's fds per agent: once its rings are handed over, two doorbells and no
    segment fd (Python's mmap of an fd keeps a dup of it; `map_shared` does not), while the
    mapping still is the segment the agent maps."""
    def open_fds() -> dict[int, str]:
        # What each fd is, not how many: another test's threads or garbage may close their
        # own fds meanwhile (a count alone went wrong under a random test order).
        fds: dict[int, str] = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # the listing's own fd, or one closed since
                pass
        return fds

    before = open_fds()
    pairs = [RingPair.create(8, 256) for _ in range(5)]
    for pair in pairs:
        pair.handed_over()
    after = open_fds()
    new = {fd: what for fd, what in after.items() if before.get(fd) != what}
    doorbells = {fd for pair in pairs for fd in pair._doorbells}
    assert set(new) == doorbells
    assert all("eventfd" in what for what in new.values())
    for pair in pairs:
        pair.close()
    assert not doorbells & set(open_fds())

    from kernel.doors.ring import map_shared

    fd = os.memfd_create("probe", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8192)
    mapped = map_shared(fd, 8192)
    other = __import__("mmap").mmap(fd, 8192)  # an independent mapping of the same segment
    os.close(fd)
    mapped[4096:4101] = b"hello"
    assert other[4096:4101] == b"hello"
    other[0:3] = b"abc"
    assert mapped[0:3] == b"abc"
    mapped.close()
    other.close()
    with pytest.raises(ValueError):
        mapped[0]
