"""The zygote launcher: agents forked from one warm template share nothing and reach nothing;
a dead zygote is restarted while starts fall back to the exec launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.proc import sandbox
from kernel.proc.table import FDS_PER_AGENT
from tests.conftest import ROOT, TEST_TIER, KernelProcess, process_memory, wait_until

PROBE = str(ROOT / "tests" / "hostile" / "zygote_probe.py")
IDLE = str(ROOT / "tests" / "agents" / "idle.py")
IMPORTS = str(ROOT / "tests" / "agents" / "imports.py")
ORPHANER = str(ROOT / "tests" / "agents" / "orphaner.py")
TIERS = [t for t in ("standard", "strict") if TEST_TIER == "strict" or t == TEST_TIER]
if "standard" in TIERS and sandbox.unreachable_dir(os.path.realpath(sys.executable), 65534,
                                                   65534):
    TIERS.remove("standard")  # this Python is out of an agent uid's reach outside bwrap

pytestmark = pytest.mark.skipif(TEST_TIER == "none", reason="agents get no uid of their own")


@pytest.fixture
def base() -> Iterator[Path]:
    """A state dir every agent uid can pass through (the standard tier sees the host's)."""
    path = Path(tempfile.mkdtemp(prefix="agentos-zygote-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def boot(base: Path, zygote: bool) -> KernelProcess:
    config = base / "kernel.toml"
    config.write_text(f"[kernel]\nzygote = {str(zygote).lower()}\nhome_bytes = 0\n")
    k = KernelProcess(base / "state")
    k.extra_args = ["--config", str(config)]
    return k.start()


@pytest.fixture(scope="module")
def zkernel() -> Iterator[KernelProcess]:
    path = Path(tempfile.mkdtemp(prefix="agentos-zygote-"))
    path.chmod(0o711)
    k = boot(path, True)
    yield k
    k.stop()
    k.unmount_homes()
    shutil.rmtree(path, ignore_errors=True)


def probe(conn, tier: str, name: str, neighbour_pid: int, neighbour_id: int) -> tuple[int, dict]:
    agent_id = conn.proc.spawn(PROBE, name=name, sandbox=tier,
                               argv=[str(neighbour_pid), str(neighbour_id)])
    assert wait_until(lambda: conn.proc.logs(agent_id).data, timeout=30), \
        conn.proc.logs(agent_id, "stderr").data.decode()
    return agent_id, json.loads(conn.proc.logs(agent_id).data.splitlines()[0])


@pytest.mark.parametrize("tier", TIERS)
def test_forked_agents_share_nothing_and_reach_nothing(zkernel: KernelProcess,
                                                       tier: str) -> None:
    with zkernel.connect() as conn:
        a_id, a = probe(conn, tier, f"a-{tier}", os.getpid(), 0)
        a_pid = conn.proc.info(a_id).pid
        b_id, b = probe(conn, tier, f"b-{tier}", a_pid, a_id)
        for agent_id in (a_id, b_id):
            assert "zygote" in conn.proc.info(agent_id).layers
        # No fd of the template (its control socket, pipes, pid namespace): stdio and the
        # agent's own rings (memfds, eventfds) only.
        for found in (a, b):
            rings = {str(fd) for fd in found["rings"]}
            assert len(rings) == 4
            stray = {fd: what for fd, what in found["fds"].items()
                     if int(fd) > 2 and fd not in rings}
            assert not stray, (stray, found["rings"])
        assert a["env"] == b["env"] and a["token"] != b["token"]
        assert a["random"] != b["random"] and a["urandom"] != b["urandom"]
        for attack in ("kill", "mem", "environ", "ptrace", "endpoint"):
            assert b[attack] != "ok", (attack, b)
        # The neighbour's token is nowhere in B's memory; B's own is (the scan works).
        token_a = a["token"].encode()
        assert len(token_a) > 20
        dump = process_memory(conn.proc.info(b_id).pid)
        assert b["token"].encode() in dump
        assert token_a not in dump
        # Nor in the template's: it passed both starts on without reading them; nor in the
        # spare waiting for the next strict agent, forked from it since.
        template = process_memory(zygote_pid(zkernel) or 0)
        assert len(template) > 1 << 20
        assert token_a not in template and b["token"].encode() not in template
        for spare in spare_pids(zkernel):
            memory = process_memory(spare)
            assert len(memory) > 1 << 20
            assert token_a not in memory and b["token"].encode() not in memory
        assert conn.proc.info(a_id).state == "running"
        for agent_id in (a_id, b_id):
            conn.proc.kill(agent_id, grace=0)
            assert conn.proc.wait(agent_id, timeout=30).state == "killed"


def zygote_pid(k: KernelProcess) -> int | None:
    assert k.proc is not None
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if b"kernel.proc.zygote" in cmd and ppid == k.proc.pid:
                return int(entry)
    return None


def nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def live_processes(uid: int, ppid: int | None = None) -> list[int]:
    """Processes of real uid `uid` (children of `ppid` only, if given), zombies left out."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if (int(fields["Uid"].split()[0]) == uid and not fields["State"].strip()
                    .startswith("Z") and ppid in (None, int(fields["PPid"]))):
                found.append(int(entry))
    return found


def spare_pids(k: KernelProcess) -> list[int]:
    """The zygote's children that are no agent yet: root's, waiting for the next strict
    agent (kernel/proc/zygote.py `Spares`)."""
    return live_processes(0, zygote_pid(k))


@pytest.mark.skipif("strict" not in TIERS, reason="spares are the strict tier's")
def test_strict_agents_start_prepared_and_a_dead_spare_is_replaced(zkernel: KernelProcess) -> None:
    """A strict agent starts from a spare that made its namespaces and shared root ahead;
    a spare killed while it waits is nobody's exit, and the next start makes another."""
    with zkernel.connect() as conn:
        first = conn.proc.spawn(IDLE, name="spare-first", sandbox="strict")
        assert "zygote" in conn.proc.info(first).layers
        with sqlite3.connect(zkernel.state_dir / "kernel.db") as db:
            [(text,)] = db.execute("SELECT layers FROM agents WHERE id=?", (first,))
        assert json.loads(text)["layers"]["namespaces"]["prepared"] > 5
        assert wait_until(lambda: len(spare_pids(zkernel)) == 1, timeout=10)
        [spare] = spare_pids(zkernel)
        # A spare waits in the background; the agent it becomes runs at its own nice value.
        assert wait_until(lambda: nice(spare) == 19, timeout=10)  # set just after its fork
        assert nice(conn.proc.info(first).pid) == sandbox.Limits().nice
        os.kill(spare, signal.SIGKILL)
        assert wait_until(lambda: spare not in spare_pids(zkernel), timeout=10)
        second = conn.proc.spawn(IDLE, name="spare-second", sandbox="strict")
        info = conn.proc.info(second)
        assert info.state == "running" and "zygote" in (info.layers or "")
        assert wait_until(lambda: conn.proc.logs(second).data, timeout=30)
        assert conn.proc.info(first).state == "running"  # the spare's death was not its
        for agent_id in (first, second):
            conn.proc.kill(agent_id, grace=0)
            assert conn.proc.wait(agent_id, timeout=30).state == "killed"


@pytest.mark.skipif("strict" not in TIERS, reason="the strict tier's own pid namespace")
@pytest.mark.parametrize("grace", [0, 2])
def test_ending_a_strict_agent_by_its_pid_1_ends_every_process_of_it(
        zkernel: KernelProcess, grace: float) -> None:
    """A strict agent from the zygote is signalled through its pid 1's pidfd, not by a scan
    of every process on the host: its orphaned grandchild, which ignores SIGTERM, still
    ends with it (the namespace dies with its pid 1), SIGTERM or SIGKILL."""
    with zkernel.connect() as conn:
        a = conn.proc.spawn(ORPHANER, name=f"orphaner-{grace}", sandbox="strict")
        assert wait_until(lambda: conn.proc.logs(a).data == b"ready\n", timeout=30), \
            conn.proc.logs(a, "stderr").data
        uid = conn.proc.info(a).uid
        assert uid is not None and len(live_processes(uid)) == 2  # the agent, its grandchild
        conn.proc.kill(a, grace=grace)
        assert conn.proc.wait(a, timeout=30).state == "killed"
    assert wait_until(lambda: not live_processes(uid), timeout=5), live_processes(uid)


def test_a_dead_zygote_is_restarted_and_starts_fall_back(base: Path) -> None:
    k = boot(base, True)
    try:
        with k.connect() as conn:
            first = conn.proc.spawn(IDLE, name="first")
            assert "zygote" in conn.proc.info(first).layers
            pid = zygote_pid(k)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            # Its agents die with it (PDEATHSIG) and are reaped as killed.
            assert conn.proc.wait(first, timeout=30).state == "killed"
            fallback = conn.proc.spawn(IDLE, name="fallback")
            info = conn.proc.info(fallback)
            assert info.state == "running" and "zygote" not in info.layers
            assert "the zygote died" in k.log()
            assert wait_until(lambda: zygote_pid(k) not in (None, pid), timeout=10)
            later = conn.proc.spawn(IDLE, name="later")
            assert "zygote" in conn.proc.info(later).layers
    finally:
        k.stop()


def test_the_exec_launcher_still_runs_agents_with_the_zygote_off(base: Path) -> None:
    k = boot(base, False)
    try:
        with k.connect() as conn:
            agent_id, found = probe(conn, TEST_TIER, "plain", os.getpid(), 0)
            assert "zygote" not in conn.proc.info(agent_id).layers
            assert found["kill"] != "ok" and found["ptrace"] != "ok"
            assert zygote_pid(k) is None
    finally:
        k.stop()


def test_an_idle_agent_costs_the_kernel_at_most_fds_per_agent(zkernel: KernelProcess) -> None:
    """pidfd, two log pipes, its endpoint's listener and connection, its door and egress
    listeners, its two ring doorbells: what bounds how many agents a kernel holds under
    RLIMIT_NOFILE (no log files, no ring segment fds, no fd per uid lease)."""
    assert zkernel.proc is not None
    kernel_fds = f"/proc/{zkernel.proc.pid}/fd"
    with zkernel.connect() as conn:
        first = conn.proc.spawn(IDLE, name="fd-first")  # whatever a first start sets up
        assert wait_until(lambda: conn.proc.logs(first).data)
        before = len(os.listdir(kernel_fds))
        ids = [conn.proc.spawn(IDLE, name=f"fd-{i}") for i in range(3)]
        for agent_id in ids:
            assert wait_until(lambda a=agent_id: conn.proc.logs(a).data)
        per_agent = (len(os.listdir(kernel_fds)) - before) / len(ids)
        for agent_id in (first, *ids):
            conn.proc.kill(agent_id, grace=0)
            conn.proc.wait(agent_id, timeout=30)
    assert per_agent <= FDS_PER_AGENT, per_agent


def test_an_agent_imports_no_sdk_module_after_the_fork(zkernel: KernelProcess) -> None:
    """A module imported after the fork is the agent's own memory (~0.2 MB each: 2.4 MB of an
    idle agent's 8 MB was the SDK's syscall families, imported at connect): the template
    preloads what every agent's connection imports."""
    with zkernel.connect() as conn:
        agent_id = conn.proc.spawn(IMPORTS, name="imports", sandbox=TIERS[0])
        info = conn.proc.wait(agent_id, timeout=60)
        assert "zygote" in info.layers, info.layers
        after_fork = json.loads(conn.proc.logs(agent_id).data.splitlines()[0])
    assert after_fork is not None  # forked: the template said what it had
    assert [m for m in after_fork if m == "sdk" or m.startswith("sdk.")] == []
    assert not {"argparse", "secrets", "hmac", "hashlib", "re"} & set(after_fork)


def test_templates_are_bounded_and_further_interpreters_use_the_exec_launcher() -> None:
    """Each distinct agent interpreter (every user-built venv has its own) would get a ~40 MB
    template: past `zygotes_max` its agents start through the exec launcher instead, and no
    template is started for it."""
    from kernel.config import Config
    from kernel.proc.zygote import Zygotes

    said: list[str] = []

    class Log:
        def info(self, message: str, **_: object) -> None:
            said.append(message)

        warning = info

    assert Config().zygotes_max == 4
    zygotes = Zygotes(Log(), limit=0)
    assert zygotes.spawn(sys.executable, "strict", [], "{}", -1, -1, -1, ()) is None
    assert zygotes.by_python == {} and "zygotes_max" in said[0]


def test_a_template_that_warms_up_after_the_first_wait_is_used_once_ready() -> None:
    """The first spawn after boot waits READY_WAIT for the template; on a loaded machine it
    can take longer. Its "ready" is still read by a later, zero-timeout check, so later agents
    fork from it instead of all going to the exec launcher for the kernel's life."""
    from kernel.proc.zygote import Zygote

    zygote = Zygote(sys.executable)
    assert zygote.start() is None
    try:
        assert not zygote.wait_ready(0)  # just started: not yet ready, and no wait for it
        assert wait_until(lambda: zygote.wait_ready(0), timeout=60)
    finally:
        zygote.stop()
