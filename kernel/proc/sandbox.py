"""Agent sandbox policy: what this machine can enforce, what each tier needs, how to launch."""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import functools
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.proc import signaller

FORWARDED = ("door", "proxy")  # the kernel services a sandbox may have listeners for

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The layers each tier applies, in the order the launcher applies them: namespaces first (bwrap
# and unshare need root), rlimits while still root (it may raise them), then the uid, then the
# restrictions that are permanent, seccomp last so it does not block the launcher's own setup.
# `namespaces` is bubblewrap (mount, pid, net, ipc, uts, cgroup); `unshare` is the standard
# tier's lighter pair, made by the launcher itself: an IPC and a network namespace, so SysV IPC
# objects and abstract Unix socket names are the agent's own (Landlock's scope only stops the
# agent connecting *out* to the host's abstract names, not host programs connecting *in* to a
# name it binds). The host's filesystem stays visible in `standard`, through Landlock.
# `none` only scrubs the environment, closes stray fds and ties the agent's life to the kernel.
LAYERS = ("namespaces", "unshare", "rlimits", "identity", "nnp", "landlock", "seccomp")
TIERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "standard": ("unshare", "rlimits", "identity", "nnp", "landlock", "seccomp"),
    "strict": ("namespaces", "rlimits", "identity", "nnp", "landlock", "seccomp"),
    # Tool processes (kernel/tools) under the kernel's own uid where agents cannot get one:
    # the filesystem, syscall and rlimit layers without the uid change. `network` is for tools
    # whose job is the network (HTTP fetch): Landlock's TCP rule and the socket filter would
    # stop them, so they keep only rlimits and no_new_privs.
    "confined": ("rlimits", "nnp", "landlock", "seccomp"),
    "network": ("rlimits", "nnp"),
}

# Read-only for every agent: the system's shared libraries and programs, and the public CA
# certificates (HTTP clients such as httpx load them when they are made, TLS or not).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/localtime", "/etc/ssl/certs")

# `python -I` leaves the working directory (the agent's home, which the agent writes) out of
# sys.path, so a planted `kernel/` package there is never imported by the root launcher; `-S`
# skips site-packages and its .pth hooks: the launcher is stdlib and ctypes only.
BOOT = ("import sys;sys.path.insert(0,sys.argv.pop(1));"
        "from kernel.proc.launch import main;main()")


class LaunchExit(enum.IntEnum):
    """Exit statuses of the launcher when it refuses to start the agent (see its report)."""

    POLICY = 111  # the policy is missing, malformed, or names a path that does not exist
    IDENTITY = 112  # could not become the agent's uid/gid, or its home is not private to it
    RLIMITS = 113
    NAMESPACES = 114  # bwrap missing, or a path to bind is unsafe (bwrap's own errors exit 1)
    NNP = 115
    LANDLOCK = 116
    SECCOMP = 117
    PARENT = 118  # the kernel died while the launcher ran
    EXEC = 119  # the agent's program is missing or not executable by the agent's uid


LAYER_EXIT = {"identity": LaunchExit.IDENTITY, "rlimits": LaunchExit.RLIMITS,
              "namespaces": LaunchExit.NAMESPACES, "unshare": LaunchExit.NAMESPACES,
              "nnp": LaunchExit.NNP,
              "landlock": LaunchExit.LANDLOCK, "seccomp": LaunchExit.SECCOMP}


class SandboxUnavailable(Exception):
    """A tier needs layers this machine lacks; the kernel must not start the agent."""

    def __init__(self, tier: str, missing: dict[str, str]) -> None:
        self.tier = tier
        self.missing = missing
        why = "; ".join(f"{layer}: {reason}" for layer, reason in missing.items())
        super().__init__(f"sandbox tier {tier!r} is not available on this machine ({why}); "
                         "ask for a weaker tier explicitly to run agents anyway")


@dataclass(frozen=True)
class Limits:
    """rlimits, soft = hard so the agent cannot raise them; None leaves one unchanged.

    `processes` (RLIMIT_NPROC) counts every process of the agent's uid, so it bounds one agent
    only when the agent has a uid of its own (the identity layer)."""

    address_space: int | None = 4 << 30
    cpu_seconds: int | None = None
    open_files: int | None = 256
    processes: int | None = 64
    file_size: int | None = 1 << 30
    core: int = 0
    tmp_bytes: int = 64 << 20  # the strict tier's private /tmp (tmpfs)
    # CPU niceness (0..19), below the kernel's: on a busy machine an agent never takes the
    # CPU from the kernel that serves it and every other agent (measured in tools/bench/
    # syscall.py: 16 agents' batched syscalls 59k/s at nice 0, 102k/s at nice 5).
    nice: int | None = 5


@dataclass
class Policy:
    """What the launcher applies to one agent. Paths are absolute; home is always writable."""

    tier: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    readable: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    socket_dir: str | None = None  # the only kernel endpoint directory the agent may see
    limits: Limits = field(default_factory=Limits)
    keep_fds: tuple[int, ...] = ()  # inherited by the agent at the same numbers
    env: dict[str, str] = field(default_factory=dict)  # the agent's whole environment
    # path -> [device, inode] the kernel resolved and checked: the launcher grants a pinned
    # path only if it opens that very file (kernel/proc/resolve.py).
    pins: dict[str, list[int]] = field(default_factory=dict)
    # port -> service: loopback listeners in the agent's own network namespace, handed to the
    # kernel, which serves them (kernel/proc/forward.py). Only where it has one (strict,
    # standard).
    forwards: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return TIERS[self.tier]

    def validate(self) -> None:
        """Raise ValueError naming the first field the launcher could not apply safely."""
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r} (one of {', '.join(TIERS)})")
        if "identity" in self.layers:
            for name in ("uid", "gid"):
                value = getattr(self, name)
                # Never 0 (root), never -1 (the "unchanged" marker of set*id).
                if not _is_int(value) or not 0 < value < 2**32 - 1:
                    raise ValueError(f"tier {self.tier} needs a non-root {name}, got {value!r}")
            if self.home is None:
                raise ValueError(f"tier {self.tier} needs a home directory")
        for path in (self.home, self.socket_dir, *self.readable, *self.writable):
            if path is not None and not _is_clean_path(path):
                raise ValueError(f"not an absolute normalised path: {path!r}")
        for fd in self.keep_fds:
            if not _is_int(fd) or fd < 3:
                raise ValueError(f"keep_fds holds {fd!r}; 0-2 are always kept")
        for key, value in self.env.items():
            if (not isinstance(key, str) or not isinstance(value, str) or not key
                    or "=" in key or "\0" in key + value):
                raise ValueError(f"bad environment entry {key!r}")
        for path, ident in self.pins.items():
            if (not _is_clean_path(path) or not isinstance(ident, list) or len(ident) != 2
                    or not all(_is_int(n) and n >= 0 for n in ident)):
                raise ValueError(f"bad pin {path!r}: {ident!r}")
        if self.forwards and not {"namespaces", "unshare"} & set(self.layers):
            raise ValueError(f"tier {self.tier} has no network namespace to forward ports in")
        for port, name in self.forwards.items():
            if not (isinstance(port, str) and port.isdigit() and 0 < int(port) < 65536
                    and name in FORWARDED):
                raise ValueError(f"bad forward {port!r} -> {name!r}")
        for name, value in dataclasses.asdict(self.limits).items():
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"limit {name} must be a non-negative int, got {value!r}")
        if self.limits.tmp_bytes <= 0:  # tmpfs reads size=0 as "no limit"
            raise ValueError("limit tmp_bytes must be positive")

    def to_json(self) -> str:
        # Shallow: json writes the tuples, lists and dicts as they are, and asdict's deep copy
        # was ~5% of a spawn's time on the kernel's loop.
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["limits"] = {f.name: getattr(self.limits, f.name)
                          for f in dataclasses.fields(self.limits)}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Policy:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a policy is a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) - names:
            raise ValueError(f"unknown policy fields: {sorted(set(data) - names)}")
        limits = data.pop("limits", {})
        if not isinstance(limits, dict):
            raise ValueError("limits must be an object")
        for name in ("readable", "writable", "keep_fds"):
            if name in data:
                if not isinstance(data[name], list):
                    raise ValueError(f"{name} must be a list")
                data[name] = tuple(data[name])
        for name in ("env", "pins", "forwards"):
            if not isinstance(data.get(name, {}), dict):
                raise ValueError(f"{name} must be an object")
        try:
            policy = cls(**data, limits=Limits(**limits))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        policy.validate()
        return policy


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_clean_path(path: object) -> bool:
    return (isinstance(path, str) and path.startswith("/") and "\0" not in path
            and os.path.normpath(path) == path and not path.startswith("//"))


# --- what this machine supports -------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """Which layers this machine can apply; `missing` says why a layer cannot."""

    missing: dict[str, str]
    landlock_abi: int = 0
    bwrap: str | None = None

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(layer for layer in LAYERS if layer not in self.missing)


_PR_GET_NO_NEW_PRIVS = 39
_CAP_SETGID = 6
_CAP_SETUID = 7


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _can_change_identity() -> bool:
    caps = _effective_caps()
    return os.geteuid() == 0 and bool(caps >> _CAP_SETUID & 1) and bool(caps >> _CAP_SETGID & 1)


def _bwrap_works(bwrap: str) -> str | None:
    """Run bwrap the way the launcher will (as root, no user namespace); None if it worked."""
    import subprocess  # here, not at the top: the launcher imports this module at every start

    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--ro-bind", "/", "/",
           "--proc", "/proc", "--dev", "/dev", "--", bwrap, "--version"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                              env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap did not run: {exc}"
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return f"bwrap cannot make namespaces here: {err[-1] if err else done.returncode}"
    return None


CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000


def _unshare_works() -> str | None:
    """Make the standard tier's namespaces in a throwaway child; None if that worked."""
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.fork()
    if pid == 0:
        failed = libc.unshare(CLONE_NEWIPC | CLONE_NEWNET) != 0
        os._exit(ctypes.get_errno() & 0x7F if failed else 0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    why = os.strerror(code) if code > 0 else f"killed by signal {-code}"
    return (f"cannot make IPC and network namespaces ({why}; needs CAP_SYS_ADMIN): SysV IPC "
            "and abstract Unix sockets would be the host's")


def probe() -> Probe:
    """Find out which layers this machine supports (forks once and runs bwrap once: a few
    milliseconds)."""
    from kernel.proc import landlock, seccomp

    missing: dict[str, str] = {}
    root = _can_change_identity()
    if not root:
        missing["identity"] = "the kernel is not root (needs CAP_SETUID and CAP_SETGID)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) < 0:
        missing["nnp"] = "kernel has no PR_SET_NO_NEW_PRIVS"
    abi = landlock.abi_version()
    if abi < 1:
        missing["landlock"] = "kernel has no Landlock (older than 5.13, or not in lsm=)"
    reason = seccomp.unavailable()
    if reason:
        missing["seccomp"] = reason
    if not root:
        missing["unshare"] = "the kernel is not root (the launcher unshares as root)"
    else:
        reason = _unshare_works()
        if reason:
            missing["unshare"] = reason
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        missing["namespaces"] = "bubblewrap (bwrap) is not installed"
    elif not root:
        missing["namespaces"] = "the launcher runs bwrap as root and drops to the agent uid inside"
    else:
        reason = _bwrap_works(bwrap)
        if reason:
            missing["namespaces"] = reason
    return Probe(missing, landlock_abi=abi, bwrap=bwrap)


def plan(tier: str, probe: Probe) -> tuple[str, ...]:
    """The layers `tier` applies; SandboxUnavailable if this machine lacks any (fail closed)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r} (one of {', '.join(TIERS)})")
    missing = {layer: probe.missing[layer] for layer in TIERS[tier] if layer in probe.missing}
    if missing:
        raise SandboxUnavailable(tier, missing)
    return TIERS[tier]


# --- what the kernel prepares ---------------------------------------------------------------

# How long a scan of /proc's owners stands for the next spawns: a scan costs ~10 µs per
# process (2,700 processes at 1,300 agents: ~21% of a spawn's time on the loop). Other agentos
# kernels' agents are kept off our uids by the host-wide leases (kernel/proc/uids.py); the scan
# is for anything else that runs under a uid of our range, which does not appear by the second.
HOST_UIDS_MAX_AGE = 2.0
_host_uids_seen: tuple[float, frozenset[int]] = (-1e9, frozenset())


def host_uids(max_age: float = 0.0) -> frozenset[int]:
    """The uids that own a process on this host (from /proc), as of at most `max_age` seconds
    ago."""
    global _host_uids_seen
    at, uids = _host_uids_seen
    now = time.monotonic()
    if now - at <= max_age:
        return uids
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                found.add(entry.stat(follow_symlinks=False).st_uid)
            except OSError:
                pass  # it exited meanwhile
    _host_uids_seen = (now, frozenset(found))
    return _host_uids_seen[1]


def allocate_uid(agent_id: int, base: int = 200000, size: int = 65536,
                 in_use: Iterable[int] = (), *, skip_busy: bool = False,
                 take: Callable[[int], bool] | None = None) -> int:
    """The uid (and gid) for an agent: base + agent_id mod size, skipping live agents' uids and
    any uid the passwd database names, and with `skip_busy` any uid that owns a process on
    the host (another kernel with an overlapping range: the reap of one agent kills every
    process of its uid, so two agents must never share one). Deterministic for a given
    host, so a restarted kernel finds it again. `take` leases a candidate host-wide
    (`kernel/proc/uids.py`) and says whether it got it."""
    if base <= 0 or size <= 0 or base + size > 2**32 - 1:
        raise ValueError(f"bad uid range {base}+{size}")
    taken = set(in_use) | (host_uids(HOST_UIDS_MAX_AGE) if skip_busy else set())
    for step in range(size):
        uid = base + (agent_id + step) % size
        if uid in taken:
            continue
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if take is None or take(uid):
                return uid
    raise RuntimeError(f"no free uid in {base}..{base + size - 1}")


def _private_dir(path: Path, uid: int, gid: int, mode: int) -> Path:
    path.mkdir(mode=mode, exist_ok=True)
    # O_NOFOLLOW: a symlink planted where the directory should be is refused, not followed.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def prepare_home(path: str | os.PathLike[str], uid: int, gid: int) -> Path:
    """Create (or take over) an agent's home: a directory, not a symlink, uid:gid, mode 0700.
    Its parent must exist and belong to the kernel."""
    return _private_dir(Path(path), uid, gid, 0o700)


def prepare_socket_dir(path: str | os.PathLike[str], gid: int) -> Path:
    """An agent's endpoint directory: root-owned, group = the agent's gid, mode 0710, so the
    agent can reach the socket the kernel binds there but can neither list nor replace it.
    The kernel then makes the socket itself root:gid 0660. The same for the directory that
    holds its home: no uid but root and the agent's passes through it, so a home the agent
    opens to every uid is still open to none."""
    return _private_dir(Path(path), os.geteuid(), gid, 0o710)


@functools.cache
def _prefixes(python: str) -> tuple[str, ...]:
    """Another interpreter's prefixes, asked once (it may be a venv over another install)."""
    import subprocess  # here, not at the top: the launcher imports this module at every start

    done = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix, sys.base_prefix,"
                           " sys.exec_prefix, sys.base_exec_prefix, sep='\\n')"],
                          capture_output=True, timeout=30, env={}, check=True)
    return tuple(done.stdout.decode().splitlines())


def runtime_paths(python: str | None = None) -> list[str]:
    """An interpreter's files (this one's by default): the venv, the installation it points
    at, the binary's dir."""
    if python is None or python == sys.executable:
        prefixes: tuple[str, ...] = (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                     sys.base_exec_prefix)
    else:
        prefixes = _prefixes(python)
    paths = {*prefixes, os.path.dirname(os.path.realpath(python or sys.executable))}
    return sorted(p for p in paths if p and os.path.exists(p))


def default_readable(*extra: str, python: str | None = None) -> tuple[str, ...]:
    """What an agent run by `python` (this interpreter by default) needs to read: system
    libraries, the runtime, the `sdk` package, plus `extra` (the agent's own code)."""
    paths = [*SYSTEM_PATHS, *runtime_paths(python), str(PROJECT_ROOT / "sdk"), *extra]
    seen: dict[str, None] = {}
    for p in paths:
        if os.path.lexists(p):
            seen.setdefault(os.path.normpath(p), None)
    return tuple(seen)


# --- starting the launcher ------------------------------------------------------------------

def launch_argv(policy: Policy, argv: Sequence[str], *, policy_fd: int | None = None,
                report_fd: int | None = None, python: str = sys.executable) -> list[str]:
    """The command that starts `argv` under `policy`. With `policy_fd` the policy is read from
    that inherited fd; without, it travels inline in the argv, which every local user can read
    in /proc, so only do that when `policy.env` holds no secret. Start it with an empty
    environment, stdio set up, `pass_fds` = (policy_fd, report_fd, *keep_fds), in a new session,
    from a thread that lives as long as the agent (PDEATHSIG follows the parent thread)."""
    policy.validate()
    _check_argv(argv)
    cmd = [python, "-I", "-S", "-c", BOOT, str(PROJECT_ROOT)]
    bwrap = shutil.which("bwrap") if "namespaces" in policy.layers else None
    if bwrap is not None and policy_fd is not None:
        # Straight into bwrap, saving the launcher's outer stage (a whole interpreter start):
        # the caller's Popen closes the other fds, bwrap --die-with-parent ties the sandbox to
        # the caller, and the inner launcher checks it is in fresh namespaces.
        from kernel.proc.launch import bwrap_argv, namespace_ids

        cmd += ["--inside", namespace_ids()]
    cmd += ["--policy-fd", str(policy_fd)] if policy_fd is not None else ["--policy",
                                                                          policy.to_json()]
    if report_fd is not None:
        cmd += ["--report-fd", str(report_fd)]
    if bwrap is not None and policy_fd is not None:
        return bwrap_argv(bwrap, policy, [*cmd, "--", *argv])
    return [*cmd, "--", *argv]


def _check_argv(argv: Sequence[str]) -> None:
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError("argv[0] must be an absolute path (the launcher does not search PATH)")


@dataclass
class Report:
    """What the launcher said before exec: the layers it applied, or why it refused."""

    ok: bool
    tier: str = ""
    layers: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None  # as the launcher saw it: inside its pid namespace in strict
    status: int | None = None  # a LaunchExit on failure
    error: str = ""
    # The in-sandbox listeners the launcher handed over (name -> fd, now the kernel's): the
    # agent's door and egress proxy on 127.0.0.1 of its own network namespace.
    listeners: dict[str, int] = field(default_factory=dict, repr=False)
    ms: dict[str, float] = field(default_factory=dict)  # the launcher's time in each layer

    def close_listeners(self) -> None:
        for fd in self.listeners.values():
            os.close(fd)
        self.listeners.clear()

    def summary(self) -> str:
        """One line for `agentos ps`."""
        if not self.ok:
            return f"failed: {self.error}"
        parts = []
        for layer, detail in self.layers.items():
            if layer == "identity":
                parts.append(f"uid {detail['uid']}")
            elif layer == "landlock":
                parts.append(f"landlock abi {detail['abi']}")
            else:
                parts.append(layer)
        return f"{self.tier}: " + (", ".join(parts) or "no layers")


def parse_report(line: bytes | str) -> Report | None:
    """One report line, or None if it is not a final one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if record.get("event") == "exec":
        ms = record.get("ms")
        return Report(True, record.get("tier", ""), record.get("layers", {}), record.get("pid"),
                      ms=ms if isinstance(ms, dict) else {})
    if record.get("event") == "error":
        return Report(False, record.get("tier", ""), record.get("layers", {}),
                      status=record.get("status"), error=record.get("error", ""))
    return None


LISTENERS_MAX = 4  # fds a launcher may hand over (the door and the proxy today)


def read_report(fd: int, timeout: float = 10.0) -> Report:
    """Wait for the launcher's final line. The strict tier's bwrap keeps the socket open for
    the agent's life, so a final line, not EOF, ends the wait. A `listeners` line before it
    carries the in-sandbox listeners' fds (SCM_RIGHTS), which the report then holds."""
    deadline = time.monotonic() + timeout
    buf = b""
    listeners: dict[str, int] = {}
    sock = socket.socket(fileno=fd)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                report = Report(False, error=f"no report from the launcher within {timeout:g}s")
                break
            # poll, not select: a kernel holding many agents has fds above FD_SETSIZE (1024).
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(left * 1000):
                continue
            chunk, fds, _flags, _addr = socket.recv_fds(sock, 65536, LISTENERS_MAX)
            if fds:
                _take_listeners(chunk, fds, listeners)
                continue
            if not chunk:
                report = Report(False, error="the launcher ended without a report")
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            found = next((r for r in map(parse_report, lines) if r is not None), None)
            if found is not None:
                report = found
                break
    except BaseException:
        for held in listeners.values():
            os.close(held)
        raise
    finally:
        sock.detach()  # the fd stays the caller's (Launch.close)
    if report.ok:
        report.listeners = listeners
    else:
        for held in listeners.values():
            os.close(held)
    return report


def _take_listeners(chunk: bytes, fds: list[int], into: dict[str, int]) -> None:
    """One hand-over message: a JSON line naming its fds in order. Anything else, or fds past
    the names, is closed."""
    try:
        names = json.loads(chunk)["listeners"]
    except (ValueError, KeyError, TypeError):
        names = []
    for i, fd in enumerate(fds):
        name = names[i] if i < len(names) and isinstance(names[i], str) else None
        if name is None or name in into or len(into) >= LISTENERS_MAX:
            os.close(fd)
        else:
            into[name] = fd


class Launch:
    """One sandboxed start: the argv and fds for Popen, then the launcher's report."""

    def __init__(self, policy: Policy, argv: Sequence[str], python: str = sys.executable) -> None:
        policy.validate()  # refuse a bad policy or argv before making any fd
        _check_argv(argv)
        self.policy = policy
        self.agent_argv = list(argv)
        self.python = python
        self.policy_json = policy.to_json()
        # A memfd, not a file or argv: the policy's env carries the agent's token.
        self.policy_fd = os.memfd_create("agentos-policy", os.MFD_CLOEXEC)
        # A socket, not a pipe: the launcher hands the in-sandbox listeners over on it (one
        # message per send, so a hand-over and its names arrive together).
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.report_fd, self._report_w = ours.detach(), theirs.detach()
        data = self.policy_json.encode()
        while data:
            data = data[os.write(self.policy_fd, data):]
        self._argv: list[str] | None = None
        self.pass_fds = (self.policy_fd, self._report_w, *policy.keep_fds)

    @property
    def argv(self) -> list[str]:
        """The exec launcher's command, made on first use: a start the zygote takes needs
        none (building bubblewrap's argv was ~15% of a strict spawn's time on the loop)."""
        if self._argv is None:
            if self.policy_fd < 0:
                raise RuntimeError("the launch's fds are already handed over")
            self._argv = launch_argv(self.policy, self.agent_argv, policy_fd=self.policy_fd,
                                     report_fd=self._report_w, python=self.python)
        return self._argv

    @property
    def report_w(self) -> int:
        """The launcher's end of the report pipe (a zygote start hands it over by fd)."""
        return self._report_w

    def spawned(self) -> None:
        """The child holds its copies now: close ours, so EOF means the launcher is gone."""
        for name in ("policy_fd", "_report_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def report(self, timeout: float = 10.0) -> Report:
        self.spawned()
        return read_report(self.report_fd, timeout)

    def close(self) -> None:
        self.spawned()
        if self.report_fd >= 0:
            os.close(self.report_fd)
            self.report_fd = -1

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kill_uid(uid: int, sig: int = signal.SIGKILL) -> None:
    """Signal every process of a dedicated agent uid, whatever session, process group or pid
    namespace it moved to: a child becomes that uid and calls kill(-1, sig) — a child of the
    small signal helper (kernel/proc/signaller.py), not of the caller, where it can."""
    if uid <= 0 or uid == os.getuid():
        raise ValueError(f"refusing to signal every process of uid {uid}")
    if not signaller.HELPER.signal_uid(uid, sig):
        # The helper is down: the kernel forks itself, at the cost signaller.py gives.
        signaller.fork_and_signal(uid, sig)


_IPC_RMID = 0


def remove_sysv_objects(uid: int) -> dict[str, int]:
    """Remove the SysV IPC objects (shared memory, message queues, semaphore sets) that `uid`
    owns or created in this IPC namespace; how many of each kind went. The sandboxed tiers
    deny SysV IPC and give the agent an IPC namespace of its own, so any found here came from
    a process of the uid outside the sandbox: memory no rlimit of the agent counted, and a
    channel to other uids that no capability governs."""
    libc = ctypes.CDLL(None, use_errno=True)
    removed: dict[str, int] = {}
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = (line.split() for line in f)
        except (OSError, ValueError):
            continue  # a kernel without SysV IPC
        col = {name: i for i, name in enumerate(header)}
        count = 0
        for row in rows:
            if uid not in (int(row[col["uid"]]), int(row[col["cuid"]])):
                continue
            ident = ctypes.c_int(int(row[1]))
            if kind == "sem":  # semctl(id, semnum, cmd, ...)
                rc = libc.semctl(ident, 0, _IPC_RMID)
            else:  # shmctl/msgctl(id, cmd, buf): a segment still attached goes at its detach
                rc = getattr(libc, f"{kind}ctl")(ident, _IPC_RMID, None)
            count += rc == 0
        if count:
            removed[kind] = count
    return removed


def unreachable_dir(path: str, uid: int, gid: int) -> str | None:
    """The first directory on `path` that uid/gid may not search, from stat bits (a probe for
    the standard tier, where the agent reaches files through the host's permissions)."""
    parts = Path(path).parts
    current = Path(parts[0])
    for part in parts[1:]:
        st = os.stat(current)
        bits = (stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid
                else stat.S_IXOTH)
        if not st.st_mode & bits:
            return str(current)
        current = current / part
    return None
