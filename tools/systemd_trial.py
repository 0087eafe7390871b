"""The service unit under a real systemd, on a machine where systemd is not PID 1.

Boots the installed systemd (252 here) as PID 1 of fresh pid, mount, cgroup, uts and ipc
namespaces, installs the unit `agentos service install` writes, and checks what `verify` and
`security` cannot: that under every hardening directive the kernel starts (`Type=notify`'s
READY=1), runs a strict agent with a loop-mounted home across a restart, is aborted by the
watchdog when its dispatch loop wedges (a drop-in runs tests/wedging_kernel.py with
`WatchdogSec=3`) and restarted with its restart=always agent reconciled, and drains with
status 0 on `systemctl stop`. Prints the figures as JSON.

Nothing of the host changes: inside the mount namespace tmpfs covers /run, /var/lib, /var/cache
and /etc/systemd/system, /proc/sys is read-only, and systemd's cgroups live under a child of
this process's own cgroup in every hierarchy (removed at the end).

    sudo .venv/bin/python -m tools.systemd_trial
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from userland.service_cli import ROOT, Service, render

SYSTEMD = "/lib/systemd/systemd"
CONFIG = "/etc/systemd/system/agentos-kernel.toml"
STATE = "/var/lib/agentos"
CGROUP_CHILD = "agentos-trial"
WATCHDOG_S = 3
KEPT_LOG = "/tmp/agentos-trial-kernel.log"
WEDGE = f"{STATE}/wedge"  # the service may write only there (ProtectSystem=strict)

# Run by bash before it becomes the namespaces' PID 1: into the child cgroups ($TRIAL_CGROUPS),
# then new namespaces, fresh cgroup mounts rooted there ($TRIAL_MOUNTS), the tmpfs, systemd.
OUTER = """
for dir in $TRIAL_CGROUPS; do echo $$ > $dir/cgroup.procs; done
exec unshare --fork --pid --mount --uts --ipc --cgroup --mount-proc --propagation private \\
  bash -c "$TRIAL_INNER"
"""
INNER = f"""
set -e
for d in /run /var/lib /var/cache /etc/systemd/system; do mount -t tmpfs -o mode=755 tmpfs $d; done
umount -R /sys/fs/cgroup
eval "$TRIAL_MOUNTS"
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
cp -r "$TRIAL_UNITS"/. /etc/systemd/system/
export container=agentos-trial
exec {SYSTEMD} --system --unit=trial.target --log-target=console
"""


class TrialError(Exception):
    pass


def _cgroups() -> dict[str, Path]:
    """This process's cgroup directory in each hierarchy, by name ("" for cgroup2)."""
    dirs = {}
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()  # a pure cgroup2 host
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            name = names.removeprefix("name=")
            base = Path("/sys/fs/cgroup") / ("" if unified else name or "unified")
            if base.is_dir():
                dirs[name] = base / path.lstrip("/")
    return dirs


def _mounts(names: list[str]) -> str:
    """Shell commands mounting each hierarchy afresh (in the new cgroup namespace, rooted at
    the child cgroup)."""
    if names == [""]:
        return "mount -t cgroup2 cgroup2 /sys/fs/cgroup"
    lines = ["mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup"]
    for name in names:
        d = f"/sys/fs/cgroup/{name or 'unified'}"
        kind = ("-t cgroup2 cgroup2" if not name else "-t cgroup -o none,name=systemd cgroup"
                if name == "systemd" else f"-t cgroup -o {name} cgroup")
        lines.append(f"mkdir -p {d} && mount {kind} {d}")
    return "\n".join(lines)


def _child_cgroups() -> dict[str, Path]:
    """A new child of this process's cgroup in every hierarchy, for systemd to live under."""
    made = {}
    for name, parent in _cgroups().items():
        child = parent / CGROUP_CHILD
        child.mkdir(exist_ok=True)
        made[name] = child
        for knob in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset takes no process
            if (parent / knob).exists():
                (child / knob).write_text((parent / knob).read_text())
    return made


def _remove_cgroups(made: dict[str, Path]) -> None:
    for child in made.values():
        for path, _, _ in os.walk(child, topdown=False):  # the deepest first
            try:
                os.rmdir(path)
            except OSError:
                pass


def _units(tmp: Path) -> Path:
    units = tmp / "units"
    dropins = units / "agentos.service.d"
    dropins.mkdir(parents=True)
    from sdk.models import default_root

    service = Service(python=sys.executable, root=str(ROOT), state_dir=STATE, config=CONFIG,
                      model_dir=str(default_root()))
    (units / "agentos.service").write_text(render(service))
    (units / "agentos-kernel.toml").write_text('[kernel]\nsandbox = "strict"\n')
    (units / "trial.target").write_text("[Unit]\nDescription=agentos trial\n"
                                        "DefaultDependencies=no\nWants=agentos.service\n")
    # No journald in the namespaces: the kernel's output goes to a file in its tmpfs /run.
    (dropins / "trial.conf").write_text("[Unit]\nDefaultDependencies=no\n[Service]\n"
                                        "StandardOutput=append:/run/agentos.log\n"
                                        "StandardError=inherit\n")
    return units


class Trial:
    def __init__(self) -> None:
        self.figures: dict[str, object] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def inside(self, script: str, timeout: float = 60, check: bool = True) -> str:
        """Run `script` in the namespaces (as root, from the checkout); its stdout."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "--", "bash", "-c",
             f"cd {shlex.quote(str(ROOT))} && export AGENTOS_STATE_DIR={STATE} && {script}"],
            capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise TrialError(f"{script!r} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def cli(self, args: str, **kwargs: object) -> str:
        return self.inside(f"{shlex.quote(sys.executable)} -m userland.cli {args}", **kwargs)

    def show(self, *props: str) -> dict[str, str]:
        out = self.inside("systemctl show " + " ".join(f"-p {p}" for p in props) + " agentos")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def until(self, what: str, predicate: object, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if predicate():  # type: ignore[operator]
                    return time.monotonic() - start
            except TrialError:
                pass  # not yet (systemd's bus, the kernel's socket)
            time.sleep(0.1)
        raise TrialError(f"timed out waiting for {what}")

    def boot(self, units: Path, cgroups: dict[str, Path]) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TRIAL_UNITS": str(units),
               "TRIAL_CGROUPS": " ".join(str(d) for d in cgroups.values()),
               "TRIAL_MOUNTS": _mounts(list(cgroups)), "TRIAL_INNER": INNER}
        self.proc = subprocess.Popen(["bash", "-c", OUTER], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

        def pid1() -> bool:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                pid = int(children.read_text().split()[0])
                self.pid1 = pid if Path(f"/proc/{pid}/exe").resolve().name == "systemd" else 0
            except (OSError, IndexError, ValueError):
                return False
            return bool(self.pid1)

        self.until("systemd to start", pid1, 20)

    def run(self) -> dict[str, object]:
        t0 = time.monotonic()
        active = self.until("agentos.service to be active (READY=1)", lambda: self.show(
            "ActiveState", "StatusText") == {"ActiveState": "active",
                                             "StatusText": "answering syscalls"}, 60)
        self.figures["ready_s"] = round(time.monotonic() - t0, 2)
        del active
        log = self.inside("cat /run/agentos.log")
        ready = next(json.loads(line) for line in log.splitlines() if '"kernel ready"' in line)
        self.figures["sandbox_missing"] = ready["sandbox"]["missing"]
        self.figures["home_quota"] = ready["sandbox"].get("home_quota")
        if ready["sandbox"]["missing"]:
            raise TrialError(f"sandbox layers missing under the unit: {ready['sandbox']}")

        # A strict agent whose first run fails after marking its home: the restart finds it.
        self.cli("run --wait --restart on-failure tests/agents/remembers.py")
        self.figures["strict_agent_home_across_restart"] = "ok"

        # The watchdog: the kernel with a handler that blocks, WatchdogSec=3.
        self.inside(
            "cat > /etc/systemd/system/agentos.service.d/wedge.conf <<EOF\n[Service]\n"
            f"ExecStart=\nExecStart={sys.executable} -m tests.wedging_kernel --state-dir {STATE} "
            f"--config {CONFIG} --log-format json\nEnvironment=AGENTOS_WEDGE={WEDGE}\n"
            f"WatchdogSec={WATCHDOG_S}\nEOF\nsystemctl daemon-reload && systemctl restart agentos")
        diarist = self.cli("run --restart always --name diarist tests/agents/diarist.py").strip()
        self.until("the diarist's first entry", lambda: "start 1" in self.cli(f"logs {diarist}"),
                   30)
        before = self.show("MainPID", "NRestarts")
        self.inside(f"touch {WEDGE}")
        wedged = time.monotonic()
        self.cli("ping", timeout=30, check=False)  # its handler wedges the loop
        self.until("the watchdog to restart the kernel", lambda: self.show(
            "MainPID", "NRestarts", "ActiveState")["NRestarts"] != before["NRestarts"], 30)
        self.figures["watchdog_restart_s"] = round(time.monotonic() - wedged, 2)
        log = self.inside("cat /run/agentos.log")
        if "_wedging_null" not in log:
            raise TrialError("no stack of the wedged loop in the log")
        self.until("the diarist reconciled", lambda: "start 2" in self.cli(f"logs {diarist}"), 30)
        info = self.cli(f"info {diarist} --json")
        record = json.loads(info)
        if record.get("state") != "running" or record.get("restarts") != 1:
            lines = self.inside(f"grep -h 'agent.: {diarist}' /run/agentos.log || true")
            raise TrialError(f"the diarist was not reconciled: {record}\n{lines}")
        self.figures["watchdog"] = {"restarts": int(self.show("NRestarts")["NRestarts"]),
                                    "agent": "restarted, diary intact"}

        self.inside("systemctl stop agentos", timeout=60)
        stopped = self.show("Result", "ExecMainStatus", "ActiveState")
        if stopped != {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}:
            raise TrialError(f"systemctl stop: {stopped}")
        mounted = self.inside("findmnt -rn -o TARGET | grep -c /var/lib/agentos/agents || true")
        self.figures["stop"] = {"status": 0, "homes_left_mounted": int(mounted.strip() or 0)}
        return self.figures

    def close(self) -> None:
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGRTMIN + 4)  # systemd: power off
            except ProcessLookupError:
                pass
        if self.proc is None:
            return
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            if self.pid1:
                os.kill(self.pid1, signal.SIGKILL)  # the namespaces' PID 1: all of them go
            self.proc.wait(10)


def trial() -> dict[str, object]:
    """Run the whole trial; its figures (TrialError says what failed)."""
    if os.geteuid() != 0 or not os.path.exists(SYSTEMD) or shutil.which("nsenter") is None:
        raise TrialError("needs root, systemd and util-linux (unshare, nsenter)")
    made: dict[str, Path] = {}
    t = Trial()
    with tempfile.TemporaryDirectory(prefix="agentos-trial-") as tmp:
        try:
            units = _units(Path(tmp))
            made = _child_cgroups()
            t.boot(units, made)
            return t.run()
        except TrialError:
            if t.pid1:  # the kernel's log, for the failure's story
                t.inside(f"cp /run/agentos.log {KEPT_LOG}", check=False)
                print(f"systemd trial: the kernel's log is in {KEPT_LOG}", file=sys.stderr)
            raise
        finally:
            t.close()
            _remove_cgroups(made)


if __name__ == "__main__":
    try:
        print(json.dumps(trial()))
    except TrialError as exc:
        print(f"systemd trial: {exc}", file=sys.stderr)
        sys.exit(1)
