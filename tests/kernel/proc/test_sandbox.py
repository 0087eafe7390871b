"""Sandbox policy, tier planning and the launcher's refusals (real launcher processes)."""

from __future__ import annotations

import atexit
import dataclasses
import errno
import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kernel.proc import launch, sandbox
from kernel.proc.sandbox import Launch, LaunchExit, Limits, Policy, Probe, Report
from tests.conftest import ROOT, TESTS, wait_until

HOSTILE = TESTS / "hostile"
PROBE = sandbox.probe()
IS_ROOT = "identity" not in PROBE.missing
# A uid range of this test process's own, so suites running side by side never share a uid
# (kill_uid and RLIMIT_NPROC act on every process of a uid).
UID_BASE = 3_000_000 + (os.getpid() % 10_000) * 100

needs_root = pytest.mark.skipif(not IS_ROOT, reason="identity not available: tests are not "
                                "root, so agents cannot get uids of their own")


def need_tier(tier: str) -> None:
    try:
        sandbox.plan(tier, PROBE)
    except sandbox.SandboxUnavailable as exc:
        pytest.skip(f"{tier} tier not available: {exc}")


def need_layer(layer: str) -> None:
    if layer in PROBE.missing:
        pytest.skip(f"{layer} not available: {PROBE.missing[layer]}")


def uid_for(n: int) -> int:
    return sandbox.allocate_uid(n, base=UID_BASE, size=100)


def uid_processes(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            found.append(int(entry))
    return found


def reachable_python(uid: int) -> str | None:
    """An interpreter an unprivileged uid can run: this one, or the system's."""
    for exe, prefix in ((sys.executable, sys.base_prefix), ("/usr/bin/python3", "/usr")):
        real = os.path.realpath(exe)
        if (os.path.exists(real) and os.stat(real).st_mode & stat.S_IXOTH
                and sandbox.unreachable_dir(real, uid, uid) is None
                and sandbox.unreachable_dir(os.path.join(prefix, "lib", "x"), uid, uid) is None):
            return exe
    return None


def agent_python(tier: str, uid: int) -> str:
    """An interpreter the agent's uid can run. Strict binds the runtime in; standard reaches it
    through the host's permissions, which a runtime under a 0700 /root does not give."""
    if tier != "standard":
        return sys.executable
    exe = reachable_python(uid)
    if exe is None:
        pytest.skip("standard tier: no Python runtime here is reachable by an unprivileged uid")
    return exe


# What `import sdk` needs besides the standard library (tests/sdk/test_sdk_light.py keeps it so).
SDK_DEPENDENCIES = ("msgspec", "zmq", "pyzmq.libs", "posix_ipc", "typing_extensions")


@functools.cache
def sdk_python(uid: int = 200000) -> str | None:
    """A Python with the SDK that agent uids can run, for kernels that must start
    standard-tier agents (their `agent_python`): this interpreter if they can reach it, else
    a venv of the system's Python of the same version (made once per session, removed at
    exit) holding copies of the SDK's dependencies. None if there is no such Python."""
    exe = reachable_python(uid)
    if exe == sys.executable or exe is None:
        return exe
    version = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    if version != str(sys.version_info[:2]):
        return None  # compiled dependencies would not load
    base = Path(tempfile.mkdtemp(prefix="agentos-sdkpy-"))
    base.chmod(0o755)
    atexit.register(shutil.rmtree, base, True)
    venv = base / "venv"
    subprocess.run([exe, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    target = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    source = Path(msgspec.__file__).parent.parent
    for entry in source.iterdir():
        if entry.name.split(".cpython")[0].removesuffix(".py") in SDK_DEPENDENCIES:
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, target / entry.name)
    # The checkout's sdk, as an installed one would be: PYTHONPATH=<checkout> does not find it
    # from inside the sandbox, where Landlock lets the agent read sdk/ but not list its parent.
    (target / "sdk").symlink_to(ROOT / "sdk")
    return str(venv / "bin" / "python")


@dataclass
class Run:
    report: Report
    returncode: int
    stdout: str
    stderr: str

    def result(self) -> Any:
        lines = (self.stdout or self.stderr).strip().splitlines()
        assert lines, f"no output (rc {self.returncode}): {self.stderr}"
        return json.loads(lines[-1])


def cleanup(proc: subprocess.Popen[bytes], uid: int | None) -> None:
    """Kill whatever the run left: the launcher's group, then every process of the agent uid."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if uid is not None and IS_ROOT:
        sandbox.kill_uid(uid)
    proc.wait(timeout=10)


def run_agent(policy: Policy, argv: Sequence[str], *, timeout: float = 30.0,
              stdout: Any = subprocess.PIPE, wrapper: Sequence[str] = (),
              env: dict[str, str] | None = None) -> Run:
    with Launch(policy, argv) as start:
        proc = subprocess.Popen([*wrapper, *start.argv], pass_fds=start.pass_fds,
                                env=env or {}, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)
        try:
            report = start.report(timeout=15)
            out, err = proc.communicate(timeout=timeout)
        finally:
            cleanup(proc, policy.uid)
    return Run(report, proc.returncode, (out or b"").decode(errors="replace"),
               err.decode(errors="replace"))


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch dir agents' uids can traverse (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="agentos-sbx-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_policy(tier: str, base: Path, uid: int, **changes: Any) -> Policy:
    home = base / f"home-{uid}"
    if IS_ROOT:
        sandbox.prepare_home(home, uid, uid)
    else:
        home.mkdir(mode=0o700, exist_ok=True)
    policy = Policy(tier=tier, uid=uid, gid=uid, home=str(home),
                    readable=sandbox.default_readable(str(HOSTILE)),
                    limits=Limits(address_space=2 << 30, processes=64),
                    env={"HOME": str(home), "TMPDIR": str(home), "PATH": "/usr/bin:/bin"})
    return replace(policy, **changes)


# --- planning ------------------------------------------------------------------------------

def test_plan_gives_each_tier_its_layers() -> None:
    full = Probe(missing={})
    assert sandbox.plan("none", full) == ()
    assert sandbox.plan("standard", full) == ("unshare", "rlimits", "identity", "nnp",
                                              "landlock", "seccomp")
    assert sandbox.plan("strict", full) == ("namespaces", "rlimits", "identity", "nnp",
                                            "landlock", "seccomp")


@pytest.mark.parametrize("layer", ["identity", "nnp", "landlock", "seccomp", "namespaces",
                                   "unshare"])
def test_plan_fails_closed_when_a_layer_is_missing(layer: str) -> None:
    probe = Probe(missing={layer: "simulated"})
    # bubblewrap makes the strict tier's namespaces, the launcher's unshare the standard's.
    needs, spared = {"namespaces": ("strict", "standard"),
                     "unshare": ("standard", "strict")}.get(layer, ("strict", None))
    with pytest.raises(sandbox.SandboxUnavailable) as info:
        sandbox.plan(needs, probe)
    assert info.value.missing == {layer: "simulated"}
    assert f"{layer}: simulated" in str(info.value)
    if spared:
        assert layer not in sandbox.plan(spared, probe)
    else:
        with pytest.raises(sandbox.SandboxUnavailable):
            sandbox.plan("standard", probe)
    assert sandbox.plan("none", probe) == ()  # asked for explicitly, no sandbox is needed


def test_plan_rejects_unknown_tier() -> None:
    with pytest.raises(ValueError):
        sandbox.plan("paranoid", Probe(missing={}))


def test_probe_names_only_known_layers() -> None:
    assert set(PROBE.missing) <= set(sandbox.LAYERS)
    assert set(PROBE.available) | set(PROBE.missing) == set(sandbox.LAYERS)
    assert ("landlock" in PROBE.missing) == (PROBE.landlock_abi == 0)


# --- policy --------------------------------------------------------------------------------

def test_policy_round_trips_through_json() -> None:
    policy = Policy(tier="strict", uid=200001, gid=200001, home="/h", readable=("/usr",),
                    writable=("/w",), socket_dir="/s", limits=Limits(cpu_seconds=5),
                    keep_fds=(5, 6), env={"A": "b"}, pins={"/usr": [1, 2]},
                    forwards={"8080": "door"})
    assert Policy.from_json(policy.to_json()) == policy
    # The shallow writer says what a deep copy (dataclasses.asdict) would.
    assert policy.to_json() == json.dumps(dataclasses.asdict(policy), separators=(",", ":"))


@pytest.mark.parametrize("change", [
    {"tier": "paranoid"}, {"uid": 0}, {"gid": None}, {"uid": True}, {"home": None},
    {"home": "relative"}, {"readable": ("/usr/../etc",)}, {"keep_fds": (2,)},
    {"env": {"A=B": "c"}}, {"env": {"A": "nul\0"}}, {"limits": Limits(open_files=-1)},
    {"limits": Limits(tmp_bytes=0)},
])
def test_policy_validation_refuses(change: dict[str, Any]) -> None:
    policy = replace(Policy(tier="standard", uid=200001, gid=200001, home="/h"), **change)
    with pytest.raises(ValueError):
        policy.validate()


def test_policy_from_json_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown policy fields"):
        Policy.from_json('{"tier": "none", "capabilities": []}')


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another uid")
def test_allocate_uid_skips_uids_that_own_processes_on_the_host() -> None:
    """Another kernel's agent (or anyone) running as a uid of the range keeps it taken: a
    reap kills every process of an agent's uid, so two agents must never share one."""
    uid = UID_BASE + 90
    other = subprocess.Popen(["sleep", "30"], user=uid, group=uid)
    try:
        assert wait_until(lambda: uid in sandbox.host_uids())
        assert sandbox.allocate_uid(0, base=uid, size=2) == uid
        assert sandbox.allocate_uid(0, base=uid, size=2, skip_busy=True) == uid + 1
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another uid")
def test_host_uids_are_scanned_at_most_once_per_max_age() -> None:
    """A spawn reuses a recent scan of /proc (it cost ~21% of a spawn at 1,300 agents); a
    caller asking for a fresh one gets it."""
    uid = UID_BASE + 91
    before = sandbox.host_uids()  # fresh
    other = subprocess.Popen(["sleep", "30"], user=uid, group=uid)
    try:
        assert uid not in before
        assert sandbox.host_uids(max_age=3600) is before  # the scan of a moment ago stands
        assert wait_until(lambda: uid in sandbox.host_uids())  # a fresh scan sees it
        assert uid in sandbox.host_uids(max_age=3600)
    finally:
        other.kill()
        other.wait()


def test_allocate_uid_is_deterministic_and_skips_taken_uids() -> None:
    assert sandbox.allocate_uid(5, base=200000, size=100) == 200005
    assert sandbox.allocate_uid(105, base=200000, size=100) == 200005
    assert sandbox.allocate_uid(5, base=200000, size=100, in_use={200005, 200006}) == 200007
    nobody = 65534  # in every passwd database: never handed to an agent
    assert sandbox.allocate_uid(0, base=nobody, size=2) == nobody + 1
    with pytest.raises(RuntimeError):
        sandbox.allocate_uid(0, base=200000, size=2, in_use={200000, 200001})


@needs_root
def test_prepare_home_is_private_and_refuses_symlinks(base: Path) -> None:
    home = sandbox.prepare_home(base / "h", 200123, 200124)
    st = home.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (200123, 200124, 0o700)
    (base / "link").symlink_to(base / "h")
    with pytest.raises(OSError):
        sandbox.prepare_home(base / "link", 200123, 200123)
    sock_dir = sandbox.prepare_socket_dir(base / "s", 200124)
    st = sock_dir.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 200124, 0o710)


def test_launch_argv_isolates_the_launcher() -> None:
    policy = Policy(tier="none")
    argv = sandbox.launch_argv(policy, ["/usr/bin/true"], policy_fd=7, report_fd=8)
    # -I: the launcher runs as root with the agent's home as its cwd; it must not import from it.
    assert argv[1] == "-I" and "--policy-fd" in argv and argv[-2:] == ["--", "/usr/bin/true"]
    inline = sandbox.launch_argv(policy, ["/usr/bin/true"])
    assert Policy.from_json(inline[inline.index("--policy") + 1]) == policy
    with pytest.raises(ValueError, match="absolute"):
        sandbox.launch_argv(policy, ["true"])


def _report_pair() -> tuple[int, int]:
    """The kernel's and the launcher's ends of a report socket (as `Launch` makes them)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return ours.detach(), theirs.detach()


def test_read_report_lines_eof_and_timeout() -> None:
    r, w = _report_pair()
    os.write(w, b'{"event": "progress"}\n{"event": "exec", "tier": "standard", "layers": '
                b'{"identity": {"uid": 7, "gid": 7}, "landlock": {"abi": 7}, "nnp": true}, '
                b'"pid": 42}\n')
    report = sandbox.read_report(r, timeout=5)
    assert report.ok and report.pid == 42
    assert report.summary() == "standard: uid 7, landlock abi 7, nnp"
    os.write(w, b'{"event": "error", "status": 116, "error": "landlock: no"}\n')
    failed = sandbox.read_report(r, timeout=5)
    assert (failed.ok, failed.status) == (False, LaunchExit.LANDLOCK)
    assert not sandbox.read_report(r, timeout=0.05).ok  # nothing more: times out
    os.close(w)
    assert "without a report" in sandbox.read_report(r, timeout=5).error
    os.close(r)


def test_read_report_takes_the_handed_over_listeners_and_closes_the_rest() -> None:
    r, w = _report_pair()
    listeners = [socket.socket() for _ in range(4)]
    sock = socket.socket(fileno=w)
    # Names for two of the three fds: the third is closed, not kept.
    socket.send_fds(sock, [b'{"listeners": ["door", "proxy"]}\n'],
                    [s.fileno() for s in listeners[:3]])
    socket.send_fds(sock, [b'not json\n'], [listeners[3].fileno()])  # no names: closed
    os.write(w, b'{"event": "exec", "tier": "strict", "layers": {}, "pid": 9}\n')
    report = sandbox.read_report(r, timeout=5)
    assert report.ok and set(report.listeners) == {"door", "proxy"}
    for fd in report.listeners.values():
        assert os.fstat(fd)  # ours now: open, a duplicate of what was sent
    before = len(os.listdir("/proc/self/fd"))
    report.close_listeners()
    assert len(os.listdir("/proc/self/fd")) == before - 2 and not report.listeners
    # A refused launch: whatever it handed over is closed with the report.
    socket.send_fds(sock, [b'{"listeners": ["door"]}\n'], [listeners[0].fileno()])
    os.write(w, b'{"event": "error", "status": 116, "error": "landlock: no"}\n')
    before = len(os.listdir("/proc/self/fd"))
    failed = sandbox.read_report(r, timeout=5)
    assert not failed.ok and not failed.listeners
    assert len(os.listdir("/proc/self/fd")) == before
    for s in listeners:
        s.close()
    sock.close()
    os.close(r)


def test_bwrap_argv_makes_parents_and_binds_outer_first() -> None:
    policy = Policy(tier="strict", uid=200001, gid=200001, home="/tmp/x/home",
                    readable=("/usr", "/opt/rt/lib", "/opt/rt/lib/extra"),
                    socket_dir="/var/lib/agentos/run/a/1")
    argv = launch.bwrap_argv("/usr/bin/bwrap", policy, ["/bin/agent"])
    joined = " ".join(argv)
    assert "--perms 0755 --dir /opt --perms 0755 --dir /opt/rt --ro-bind /opt/rt/lib" in joined
    assert "--dir /opt/rt/lib" not in joined  # inside a bind: it exists there already
    assert joined.index("--tmpfs /tmp") < joined.index("--dir /tmp/x")
    assert joined.index("--dir /tmp/x") < joined.index("--bind /tmp/x/home /tmp/x/home")
    assert "--ro-bind /var/lib/agentos/run/a/1 /var/lib/agentos/run/a/1" in joined
    assert "--unshare-net" in argv and "--die-with-parent" in argv and "--new-session" in argv
    assert argv[-4:] == ["--chdir", "/tmp/x/home", "--", "/bin/agent"]
    with pytest.raises(ValueError):
        launch.bwrap_argv("/usr/bin/bwrap", replace(policy, readable=("/",)), ["/bin/agent"])


def test_bwrap_argv_refuses_symlinked_sources(base: Path) -> None:
    (base / "real").mkdir()
    (base / "real" / "code.py").write_text("")
    (base / "link").symlink_to(base / "real")
    policy = Policy(tier="strict", uid=200001, gid=200001, home=str(base / "real"))
    # A symlink as the last component is recreated as a symlink, its target not bound...
    argv = launch.bwrap_argv("bwrap", replace(policy, readable=(str(base / "link"),)), ["/a"])
    assert ["--symlink", str(base / "real"), str(base / "link")] == argv[
        argv.index("--symlink"):argv.index("--symlink") + 3]
    # ...but one inside the path would be resolved by bwrap as root: refused.
    with pytest.raises(ValueError, match="symlink"):
        launch.bwrap_argv("bwrap", replace(policy, readable=(str(base / "link" / "code.py"),)),
                          ["/a"])


# --- the launcher, for real ----------------------------------------------------------------

PRINT_SELF = ("import json, os, ctypes; libc = ctypes.CDLL(None); sig = ctypes.c_int(); "
              "libc.prctl(2, ctypes.byref(sig), 0, 0, 0); print(json.dumps({'env': dict("
              "os.environ), 'fds': sorted(int(f) for f in os.listdir('/proc/self/fd')), "
              "'pdeathsig': sig.value, 'umask': os.umask(0)}))")


def test_none_tier_scrubs_env_and_fds(base: Path) -> None:
    stray = os.open("/dev/null", os.O_RDONLY)
    kept = os.open("/dev/null", os.O_RDONLY)
    try:
        policy = Policy(tier="none", home=str(base), keep_fds=(kept,), env={"ONLY": "this"})
        with Launch(policy, [sys.executable, "-I", "-c", PRINT_SELF]) as start:
            proc = subprocess.run(start.argv, pass_fds=(*start.pass_fds, stray),
                                  env={"SECRET": "kernel's"}, capture_output=True, timeout=30)
            report = start.report(timeout=5)
    finally:
        os.close(stray)
        os.close(kept)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert report.ok and report.layers == {} and report.tier == "none"
    assert set(report.ms) == {"total"} and report.ms["total"] > 0  # no layers, its whole time
    assert seen["env"].get("ONLY") == "this" and "SECRET" not in seen["env"]
    assert stray not in seen["fds"] and kept in seen["fds"]
    # 0-2, the kept fd, and the one listdir itself opened: the policy and report fds are gone.
    assert len(seen["fds"]) == 5
    assert seen["pdeathsig"] == signal.SIGKILL and seen["umask"] == 0o077


def test_bad_policy_exits_with_policy_status(base: Path) -> None:
    policy = Policy(tier="none", home=str(base / "missing"))
    run = run_agent(policy, [sys.executable, "-c", "pass"], env={})
    assert run.returncode == LaunchExit.POLICY and run.report.status == LaunchExit.POLICY
    assert "does not exist" in run.stderr
    done = subprocess.run([sys.executable, "-I", "-c", sandbox.BOOT, str(ROOT), "--policy",
                           "{}", "--", "/usr/bin/true"], capture_output=True, timeout=30)
    assert done.returncode == LaunchExit.POLICY


def test_symlinked_home_exits_with_policy_status(base: Path) -> None:
    (base / "home").mkdir()
    (base / "link").symlink_to(base / "home")
    run = run_agent(Policy(tier="none", home=str(base / "link")), ["/usr/bin/true"])
    assert run.returncode == LaunchExit.POLICY and "symlink" in run.report.error


def test_missing_program_exits_with_exec_status(base: Path) -> None:
    run = run_agent(Policy(tier="none", home=str(base)), ["/nonexistent/agent"])
    assert run.returncode == LaunchExit.EXEC and run.report.status == LaunchExit.EXEC


@needs_root
def test_foreign_home_exits_with_identity_status(base: Path) -> None:
    need_tier("standard")
    uid = uid_for(1)
    policy = make_policy("standard", base, uid)
    os.chown(policy.home or "", uid + 1, uid)  # someone else's home: refuse it
    run = run_agent(policy, [agent_python("standard", uid), "-c", "pass"])
    assert run.returncode == LaunchExit.IDENTITY, run.stderr
    assert not run.report.ok and "must belong to uid" in run.report.error


@needs_root
def test_missing_bwrap_exits_with_namespaces_status(base: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    uid = uid_for(2)
    policy = make_policy("strict", base, uid)
    # No bwrap where the launch is prepared (nor where it runs): the launcher must refuse.
    monkeypatch.setenv("PATH", "/nonexistent")
    run = run_agent(policy, [sys.executable, "-c", "pass"], env={"PATH": "/nonexistent"})
    assert run.returncode == LaunchExit.NAMESPACES and "bwrap" in run.report.error


# The launcher started under a seccomp filter that takes one kernel feature away: the machine
# the kernel probed is not the machine the agent starts on, and the launcher must notice.
FAULT = ("import sys, errno, json, os; sys.path.insert(0, sys.argv[1]); "
         "from kernel.proc import seccomp; f = seccomp.Filter(); "
         "[f.deny(n, getattr(errno, e), *map(tuple, c)) for n, e, c in json.loads(sys.argv[2])]; "
         "f.load(); os.execv(sys.argv[3], sys.argv[3:])")


@needs_root
@pytest.mark.parametrize(("layer", "rules", "status"), [
    ("unshare", [["unshare", "EPERM", []]], LaunchExit.NAMESPACES),
    ("rlimits", [["prlimit64", "EPERM", []], ["setrlimit", "EPERM", []]], LaunchExit.RLIMITS),
    ("nnp", [["prctl", "EINVAL", [[0, 4, 38, 0]]]], LaunchExit.NNP),
    ("landlock", [["landlock_create_ruleset", "ENOSYS", []]], LaunchExit.LANDLOCK),
    ("seccomp", [["seccomp", "ENOSYS", []]], LaunchExit.SECCOMP),
])
def test_layer_that_cannot_be_applied_is_fatal(base: Path, layer: str, rules: list[Any],
                                               status: LaunchExit) -> None:
    need_tier("standard")
    uid = uid_for(3)
    policy = make_policy("standard", base, uid)
    wrapper = [sys.executable, "-I", "-c", FAULT, str(ROOT), json.dumps(rules)]
    run = run_agent(policy, [agent_python("standard", uid), "-c", "print('escaped')"],
                    wrapper=wrapper)
    assert run.returncode == status, run.stderr
    assert run.report.status == status and run.report.error.startswith(layer)
    assert "escaped" not in run.stdout
    assert f"agentos launch: {layer}" in run.stderr


@needs_root
@pytest.mark.parametrize("tier", ["standard", "strict"])
def test_agent_dies_with_its_parent(base: Path, tier: str) -> None:
    need_tier(tier)
    uid = uid_for(4 if tier == "standard" else 5)
    policy = make_policy(tier, base, uid)
    quick = str(HOSTILE / "quick.py")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys, subprocess, time; sys.path.insert(0, sys.argv[1]); "
         "from kernel.proc.sandbox import Launch, Policy; "
         "s = Launch(Policy.from_json(sys.argv[2]), sys.argv[3:]); "
         "p = subprocess.Popen(s.argv, pass_fds=s.pass_fds, env={}, start_new_session=True); "
         "print(s.report(15).ok, flush=True); time.sleep(60)",
         str(ROOT), policy.to_json(), agent_python(tier, uid), quick, "60"],
        stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == b"True"
        assert uid_processes(uid), "the agent is not running"
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while uid_processes(uid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert uid_processes(uid) == []
    finally:
        cleanup(parent, uid)


def test_seccomp_filter_errno_and_missing_syscalls() -> None:
    need_layer("seccomp")
    from kernel.proc import seccomp

    f = seccomp.Filter()
    try:
        assert not f.deny("no_such_syscall", errno.EPERM)
        assert f.deny("ptrace", errno.EPERM)
    finally:
        f.release()


def test_a_launch_refuses_bad_argv_before_any_fd_and_builds_its_command_on_demand(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote start uses the policy and the fds, never the exec launcher's command
    (bubblewrap's argv was ~15% of a strict spawn's time on the kernel's loop): it is made
    only when asked for, once; a bad argv is still refused before any fd exists."""
    policy = make_policy("none", base, uid_for(60))
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="absolute path"):
        Launch(policy, ["python3", "-c", "pass"])
    assert set(os.listdir("/proc/self/fd")) == fds
    built = []
    real = sandbox.launch_argv
    monkeypatch.setattr(sandbox, "launch_argv", lambda *a, **k: built.append(1) or real(*a, **k))
    with Launch(policy, [sys.executable, "-c", "pass"]) as start:
        assert built == [] and json.loads(start.policy_json)["tier"] == "none"
        assert str(start.policy_fd) in start.argv and start.argv is start.argv
        assert built == [1]
