"""`agentos service install`: the systemd unit it writes passes `systemd-analyze verify`, keeps
its exposure score at or under the pinned figure, and its capability bounding set and
no_new_privs are enough for a root kernel to run strict and standard agents with home quotas."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.config import Config
from kernel.proc import homes, sandbox
from tests.conftest import ROOT, KernelProcess, agent, wait_until
from userland.service_cli import CAPABILITIES, Service, render

# `systemd-analyze security --offline=yes` (systemd 252): 9.6 UNSAFE for the unit this
# replaced; 4.1 OK for a root kernel, 1.9 OK for one under --user. Lower is better: a change
# that raises it must say why in the unit and here.
ROOT_EXPOSURE = 4.1
USER_EXPOSURE = 1.9

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")

# Directives set weaker than their strictest value: each follows a comment saying why.
RELAXED = ("ProtectHome=read-only", "PrivateDevices=no", "ProtectHostname=no",
           "ProtectProc=default", "ProcSubset=all", "RestrictAddressFamilies=",
           "RestrictNamespaces=mnt", "MemoryDenyWriteExecute=no", "PrivateNetwork=no",
           "SystemCallFilter=@system-service @mount", "CapabilityBoundingSet=CAP")


def cli(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userland.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, user=user)


def _unit(tmp: Path, *extra: str) -> Path:
    done = cli("service", "install", "--print", *extra)
    assert done.returncode == 0, done.stderr
    path = tmp / "agentos.service"
    path.write_text(done.stdout)
    return path


def _exposure(unit: Path) -> float:
    done = subprocess.run([ANALYZE, "security", "--offline=yes", str(unit)], capture_output=True,
                          text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    return float(found.group(1))


@needs_analyze
@pytest.mark.parametrize(("extra", "pinned"), [((), ROOT_EXPOSURE),
                                               (("--user", "agentos"), USER_EXPOSURE)])
def test_the_unit_verifies_and_keeps_its_exposure_score(tmp_path: Path, extra: tuple[str, ...],
                                                        pinned: float) -> None:
    unit = _unit(tmp_path, *extra)
    done = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "agentos.service" not in done.stderr, done.stderr
    assert _exposure(unit) <= pinned
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m kernel " in text and f"WorkingDirectory={ROOT}" in text


def test_every_relaxed_directive_says_why(tmp_path: Path) -> None:
    lines = _unit(tmp_path).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(RELAXED):
            assert lines[i - 1].startswith("#"), f"{line} has no comment saying why"
    assert sum(line.startswith(RELAXED) for line in lines) == len(RELAXED)


def test_the_shipped_example_is_what_the_installer_writes() -> None:
    """tools/systemd/agentos.service is the unit for a checkout at /opt/agentos, kept current."""
    example = Service(python="/opt/agentos/.venv/bin/python", root="/opt/agentos",
                      state_dir="/var/lib/agentos", config="/etc/agentos/kernel.toml",
                      model_dir="/var/cache/agentos/models", protect_home="read-only")
    assert (ROOT / "tools/systemd/agentos.service").read_text() == render(example)


def test_install_is_idempotent_and_never_overwrites_a_config(tmp_path: Path) -> None:
    units, config = tmp_path / "units", tmp_path / "etc" / "kernel.toml"
    args = ("service", "install", "--unit-dir", str(units), "--config", str(config))
    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0 and "would write" in dry.stdout and not units.exists()
    first = cli(*args, "--http", "127.0.0.1:8000")
    assert first.returncode == 0, first.stderr
    assert f"{units / 'agentos.service'}: wrote" in first.stdout
    assert "systemctl daemon-reload" in first.stdout
    assert Config.load(config).http == "127.0.0.1:8000" and Config.load(config).sandbox == "strict"
    assert oct((units / "agentos.service").stat().st_mode & 0o777) == "0o644"
    unit = (units / "agentos.service").read_text()
    config.write_text('[kernel]\nsandbox = "standard"\n')  # the operator's own edits
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "agentos.service: unchanged" in second.stdout and "kept" in second.stdout
    assert (units / "agentos.service").read_text() == unit
    assert config.read_text() == '[kernel]\nsandbox = "standard"\n'
    moved = cli(*args, "--model-dir", str(tmp_path / "models"))
    assert "agentos.service: replaced" in moved.stdout
    assert f"AGENTOS_MODEL_DIR={tmp_path / 'models'}" in (units / "agentos.service").read_text()


def test_install_refuses_clearly_when_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = cli("service", "install", "--unit-dir", str(blocker / "units"), "--config",
               str(tmp_path / "kernel.toml"))
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.startswith(f"agentos: ENOTDIR: cannot write {blocker / 'units'}")
    assert "--print" in done.stderr
    hidden = cli("service", "install", "--print", "--protect-home", "yes", "--model-dir",
                 "/home/someone/models")
    assert hidden.returncode == 1 and "would hide " in hidden.stderr
    assert "/home/someone/models from the kernel" in hidden.stderr


def _bounding_set() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or homes.unavailable() is not None,
                    reason="needs root, setpriv (util-linux) and loop-mountable homes")
def test_the_units_capabilities_and_no_new_privs_run_strict_agents(tmp_path: Path) -> None:
    """A kernel under the unit's bounding set and no_new_privs (as systemd would start it)
    still spawns strict agents as their own uids, with loop-mounted homes that survive a
    restart, and kills them. (The standard tier reaches the interpreter through the host's
    permissions, which a pyenv under /root or pytest's 0700 tmp dir deny; it needs no
    capability the strict tier does not.)"""
    try:
        sandbox.plan("strict", sandbox.probe())
    except sandbox.SandboxUnavailable as exc:
        pytest.skip(str(exc))
    numbers = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5,
               "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_NET_ADMIN": 12, "CAP_SYS_CHROOT": 18,
               "CAP_SYS_ADMIN": 21}
    have = _bounding_set()
    keep = [cap for cap in CAPABILITIES if have >> numbers[cap] & 1]
    k = KernelProcess(tmp_path / "state")
    k.prefix = ["setpriv", "--no-new-privs", "--bounding-set",
                "-all," + ",".join("+" + cap[4:].lower() for cap in keep), "--"]
    k.start()
    try:
        with k.connect() as conn:
            assert conn.sys.stats().pid == k.proc.pid
            agent_id = conn.proc.spawn(agent("remembers"), sandbox="strict",
                                       restart="on-failure")
            info = conn.proc.wait(agent_id, timeout=60)
            err = conn.proc.logs(agent_id, "stderr").data.decode()
            assert info.exit_status == 0 and info.restarts == 1, f"{info} {err}"
            assert b'"found": "first run"' in conn.proc.logs(agent_id).data
            assert info.uid and info.uid >= 200000
            blocker = conn.proc.spawn(agent("blocker"), sandbox="strict")
            assert wait_until(lambda: conn.proc.logs(blocker).data == b"blocking\n", 30)
            conn.proc.kill(blocker, grace=0)
            assert conn.proc.wait(blocker, timeout=30).state == "killed"
        status = Path(f"/proc/{k.proc.pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        assert int(re.search(r"CapBnd:\t(\w+)", status).group(1), 16) == sum(
            1 << numbers[cap] for cap in keep)
    finally:
        k.stop()
        k.unmount_homes()


@pytest.mark.skipif(not os.environ.get("AGENTOS_SYSTEMD_TRIAL"),
                    reason="boots systemd as PID 1 of new namespaces, ~30 s: set "
                           "AGENTOS_SYSTEMD_TRIAL=1 (or run python -m tools.systemd_trial)")
@pytest.mark.timeout(300)
def test_the_unit_under_a_real_systemd() -> None:
    """The installed unit under systemd itself (tools/systemd_trial.py): READY=1, every sandbox
    layer available under its directives, a strict agent's home across a restart, a wedged
    loop aborted by the watchdog and its restart=always agent reconciled, a clean stop."""
    from tools.systemd_trial import trial

    figures = trial()
    assert figures["sandbox_missing"] == {} and figures["watchdog"]["restarts"] == 1
    assert figures["stop"] == {"status": 0, "homes_left_mounted": 0}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv (util-linux)")
def test_without_cap_sys_chroot_strict_agents_start_through_bubblewrap(tmp_path: Path) -> None:
    """A zygote that cannot enter the host's mount namespace (an older unit's bounding set)
    takes no strict starts: they go to the exec launcher, the log says so once, and the agent
    runs."""
    try:
        sandbox.plan("strict", sandbox.probe())
    except sandbox.SandboxUnavailable as exc:
        pytest.skip(str(exc))
    k = KernelProcess(tmp_path / "state")
    k.prefix = ["setpriv", "--bounding-set", "-sys_chroot", "--inh-caps", "-sys_chroot", "--"]
    k.start()
    try:
        with k.connect() as conn:
            first, second = (conn.proc.spawn(agent("blocker"), sandbox="strict", name=name)
                             for name in ("first", "second"))
            for agent_id in (first, second):
                assert wait_until(lambda a=agent_id: conn.proc.logs(a).data == b"blocking\n",
                                  30), conn.proc.logs(agent_id, "stderr").data
                assert "zygote" not in (conn.proc.info(agent_id).layers or "")
                conn.proc.kill(agent_id, grace=0)
                assert conn.proc.wait(agent_id, timeout=30).state == "killed"
        assert k.log().count("does not start this tier's agents here") == 1
    finally:
        k.stop()
        k.unmount_homes()
