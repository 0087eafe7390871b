"""The agent launcher: apply a sandbox policy to this process, report it, then exec the agent."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from kernel.proc import forward, landlock, resolve, seccomp
from kernel.proc.sandbox import (
    BOOT,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    LAYER_EXIT,
    PROJECT_ROOT,
    LaunchExit,
    Limits,
    Policy,
    runtime_paths,
)

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_CAP_VERSION_3 = 0x20080522
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_NAMESPACES = ("mnt", "net", "pid")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@dataclass
class Args:
    argv: list[str]
    policy_fd: int | None = None
    policy_text: str | None = None
    report_fd: int | None = None
    inside: str | None = None  # the host's namespace inodes, set by the outer stage for bwrap


def parse_args(argv: Sequence[str]) -> Args:
    args = Args(argv=[])
    it = iter(argv)
    for opt in it:
        if opt == "--":
            args.argv = list(it)
            break
        try:
            value = next(it)
        except StopIteration:
            raise ValueError(f"{opt} needs a value") from None
        if opt == "--policy-fd":
            args.policy_fd = int(value)
        elif opt == "--policy":
            args.policy_text = value
        elif opt == "--report-fd":
            args.report_fd = int(value)
        elif opt == "--inside":
            args.inside = value
        else:
            raise ValueError(f"unknown option {opt}")
    if not args.argv:
        raise ValueError("no agent command after --")
    if (args.policy_fd is None) == (args.policy_text is None):
        raise ValueError("give exactly one of --policy-fd and --policy")
    return args


class Reporter:
    """The JSON line the kernel reads before exec, and the fatal path for a refused launch."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.tier = ""
        self.applied: dict[str, Any] = {}
        self.ms: dict[str, float] = {}  # milliseconds spent in each layer's steps
        self.started = time.perf_counter()

    def timings(self) -> dict[str, float]:
        """Each layer's milliseconds, and `total` since the launcher began: the exec report's."""
        return {**self.ms, "total": round((time.perf_counter() - self.started) * 1000, 2)}

    def send(self, record: dict[str, Any]) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(record) + "\n").encode())
        except OSError:
            pass  # nobody listens: the exit status still says what happened

    def send_fds(self, record: dict[str, Any], fds: list[int]) -> None:
        """One message with fds attached (SCM_RIGHTS): the report fd is a socket."""
        if self.fd is None:
            raise RuntimeError("no report socket to hand the listeners over on")
        sock = socket.socket(fileno=self.fd)
        try:
            socket.send_fds(sock, [(json.dumps(record) + "\n").encode()], fds)
        finally:
            sock.detach()

    def fail(self, status: LaunchExit, message: str) -> NoReturn:
        try:
            os.write(2, f"agentos launch: {message}\n".encode())
        except OSError:
            pass
        self.send({"event": "error", "tier": self.tier, "status": int(status), "error": message,
                   "layers": self.applied})
        os._exit(int(status))

    def step(self, layer: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one layer's step; any failure is fatal, with that layer's exit status (a path
        the launcher refuses to grant is the policy's fault, not the layer's)."""
        started = time.perf_counter()
        try:
            return fn(*args)
        except Refused as exc:
            self.fail(LaunchExit.POLICY, f"policy: {exc}")
        except Exception as exc:
            self.fail(LAYER_EXIT[layer], f"{layer}: {exc}")
        finally:
            self.ms[layer] = round(self.ms.get(layer, 0.0)
                                   + (time.perf_counter() - started) * 1000, 2)


def load_policy(args: Args, check_paths: bool = True) -> Policy:
    """The policy the launcher was given; with `check_paths`, its paths checked here (a spare,
    which stands in a root of its own by now, has `mounts.finish` check them on the host)."""
    if args.policy_fd is not None:
        chunks = []
        offset = 0
        while chunk := os.pread(args.policy_fd, 65536, offset):
            chunks.append(chunk)
            offset += len(chunk)
        policy = Policy.from_json(b"".join(chunks))
    else:
        policy = Policy.from_json(args.policy_text or "")
    if not check_paths:
        return policy
    for path in (policy.home, policy.socket_dir, *policy.readable, *policy.writable):
        if path is not None and not os.path.lexists(path):
            raise ValueError(f"{path} does not exist")
    # Where the agent writes, a symlink on the path could point its grant somewhere else.
    for path in (policy.home, policy.socket_dir, *policy.writable):
        if path is not None and os.path.realpath(path) != path:
            raise ValueError(f"{path} is reached through a symlink; name its real path")
    return policy


def close_fds_except(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 2**31 - 1)


# --- layers ---------------------------------------------------------------------------------

def set_rlimits(limits: Limits) -> dict[str, int]:
    table = (("address_space", resource.RLIMIT_AS), ("cpu_seconds", resource.RLIMIT_CPU),
             ("open_files", resource.RLIMIT_NOFILE), ("processes", resource.RLIMIT_NPROC),
             ("file_size", resource.RLIMIT_FSIZE), ("core", resource.RLIMIT_CORE))
    applied = {}
    for name, which in table:
        value = getattr(limits, name)
        if value is None:
            continue
        # CPU: SIGXCPU at the soft limit (catchable), SIGKILL a second later.
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        resource.setrlimit(which, (value, hard))
        applied[name] = value
    if limits.nice is not None:
        # Absolute, and only ever down in priority from the launcher's own (0..19 checked by
        # the spawner); the agent can raise it further but never lower it back unprivileged.
        os.setpriority(os.PRIO_PROCESS, 0, max(limits.nice, os.getpriority(os.PRIO_PROCESS, 0)))
        applied["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    return applied


def become(uid: int, gid: int) -> dict[str, int]:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # Leaving root clears the permitted set but not the inheritable one (bwrap's --cap-add put
    # capabilities there); clear every set so no exec can bring one back.
    header = _CapHeader(_CAP_VERSION_3, 0)
    if _libc.capset(ctypes.byref(header), (_CapData * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 or os.getgroups():
        raise RuntimeError("the uid/gid change did not take")
    with open("/proc/self/status") as f:
        caps = [line.split() for line in f if line.startswith(("CapInh", "CapPrm", "CapEff",
                                                                "CapAmb"))]
    if any(int(value, 16) for _, value in caps):
        raise RuntimeError(f"capabilities left after the uid change: {caps}")
    try:
        os.setuid(0)
    except PermissionError:
        return {"uid": uid, "gid": gid}
    raise RuntimeError("could become root again")


def die_with_parent(ppid: int) -> None:
    # Set after the uid change, which clears it; then make sure the parent did not die first.
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_PDEATHSIG")
    if os.getppid() != ppid:
        raise RuntimeError(f"the parent (pid {ppid}) died during launch")


def no_new_privs() -> bool:
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if _libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise RuntimeError("no_new_privs did not stick")
    return True


def reach(path: str, mode: int, what: str) -> None:
    """Raise PermissionError naming the directory that stops this uid from using `path`,
    walking the path as written and then its real path (a venv's `bin/python` is often a
    symlink into a pyenv under a 0700 `/root`), with the fix."""
    if os.access(path, mode):
        return
    for route in dict.fromkeys((path, os.path.realpath(path))):
        current = "/"
        for part in Path(route).parts[1:]:
            if not os.access(current, os.X_OK):
                via = "" if route == path else f" (its real path is {route})"
                raise PermissionError(
                    f"{what} {path} is out of reach of uid {os.getuid()}{via}: no search "
                    f"permission on {current}; fix: chmod o+x {current}, or use files outside "
                    f"it (for Python: install one outside {current}, or set agent_python)")
            current = os.path.join(current, part)
    wanted = "".join(c for bit, c in ((os.R_OK, "r"), (os.W_OK, "w"), (os.X_OK, "x"))
                     if mode & bit)
    raise PermissionError(f"uid {os.getuid()} lacks {wanted} permission on {what} {path}")


def check_home(home: str, uid: int) -> None:
    try:
        st = os.stat(home)
    except PermissionError:
        reach(home, os.X_OK, "home")  # names the directory in the way
        raise
    if st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"home {home} must belong to uid {uid} with mode 0700 "
                              f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
    reach(home, os.R_OK | os.W_OK | os.X_OK, "home")


class Refused(Exception):
    """A path the launcher will not grant: reached through a symlink someone other than root
    could have planted, or no longer the file the kernel resolved and checked."""


def open_granted(path: str, pins: dict[str, list[int]]) -> int:
    """An O_PATH fd on `path` that is safe to grant (kernel/proc/resolve.py): no untrusted
    symlink on the way, and, if the kernel pinned the path, the very file it checked."""
    try:
        fd = resolve.open_path(path)
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror or exc}") from None
    want = pins.get(path)
    if want is not None and resolve.identity(fd) != want:
        os.close(fd)
        raise Refused(f"{path} is not what the kernel checked: it was replaced since")
    return fd


def build_landlock(policy: Policy, private_tmp: bool) -> landlock.Ruleset:
    ruleset = landlock.Ruleset(landlock.abi_version())
    grants = [(p, landlock.READ_ONLY) for p in policy.readable]
    grants += [(p, landlock.READ_WRITE) for p in (policy.home, *policy.writable) if p]
    grants += [(d, landlock.DEVICE) for d in DEVICES if os.path.exists(d)]
    if private_tmp:
        grants.append(("/tmp", landlock.READ_WRITE))
    for path, access in grants:
        fd = open_granted(path, policy.pins)
        try:
            ruleset.allow(path, access, fd)
        finally:
            os.close(fd)
    for port in policy.forwards:
        ruleset.allow_connect(int(port))
    return ruleset


def open_forwards(policy: Policy) -> list[tuple[Any, str]]:
    """The kernel's services' listeners (door, proxy), bound as root on 127.0.0.1 of the
    agent's own namespace (the standard tier's loopback is down until this brings it up)."""
    if "unshare" in policy.layers:
        forward.loopback_up()
    return [(forward.listen(int(port)), name) for port, name in policy.forwards.items()]


def hand_over(routes: list[tuple[Any, str]], report: Reporter) -> dict[str, Any]:
    """Give the listeners to the kernel, which serves them itself (a socket stays in the
    namespace it was made in, whoever holds it); the agent keeps none of them."""
    ports = sorted(listener.getsockname()[1] for listener, _ in routes)
    report.send_fds({"listeners": [name for _, name in routes]},
                    [listener.fileno() for listener, _ in routes])
    for listener, _ in routes:
        listener.close()
    return {"ports": ports, "served_by": "kernel"}


def namespace_ids() -> str:
    return ":".join(str(os.stat(f"/proc/self/ns/{name}").st_ino) for name in _NAMESPACES)


def check_inside(host: str) -> dict[str, Any]:
    """Prove this process is not in the host's mount, network and pid namespaces."""
    same = [n for n, a, b in zip(_NAMESPACES, host.split(":"), namespace_ids().split(":"),
                                 strict=True) if a == b]
    if same:
        raise RuntimeError(f"still in the host's {', '.join(same)} namespace")
    return {"via": "bwrap", "unshared": ["mnt", "pid", "net", "ipc", "uts", "cgroup"]}


def unshare_ipc_and_net() -> dict[str, Any]:
    """The standard tier's namespaces, made as root before the uid change: SysV IPC objects
    and abstract Unix socket names of the agent's own (both go with its last process), and no
    network interface but a loopback that is down."""
    before = {name: os.stat(f"/proc/self/ns/{name}").st_ino for name in ("ipc", "net")}
    if _libc.unshare(CLONE_NEWIPC | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWIPC | CLONE_NEWNET) failed")
    same = [name for name, ino in before.items()
            if os.stat(f"/proc/self/ns/{name}").st_ino == ino]
    if same:
        raise RuntimeError(f"still in the host's {', '.join(same)} namespace")
    return {"unshared": ["ipc", "net"]}


def _launcher_paths() -> list[str]:
    """What the launcher itself needs inside the namespaces: it is visible there, but Landlock
    keeps the agent from reading it unless the policy lists it."""
    return [str(PROJECT_ROOT / "kernel" / "__init__.py"), str(PROJECT_ROOT / "kernel" / "proc"),
            *runtime_paths()]


def bwrap_argv(bwrap: str, policy: Policy, command: Sequence[str]) -> list[str]:
    """bwrap run as root: new namespaces but the user one, a tmpfs root holding only the
    policy's paths at their host paths, and just the capabilities the inner launcher needs to
    become the agent's uid (it drops them all)."""
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv",
            "--hostname", "agent", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
            "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SYS_RESOURCE"]
    mounts: dict[str, str] = {"/dev": "dev", "/proc": "proc", "/tmp": "tmpfs"}
    for path in (*policy.readable, *_launcher_paths()):
        mounts.setdefault(path, "ro")
    if policy.socket_dir:
        # connect() to a socket needs no write access to the mount it sits on.
        mounts[policy.socket_dir] = "ro"
    for path in (policy.home, *policy.writable):
        if path:
            mounts[path] = "rw"
    binds = [p for p, kind in mounts.items() if kind in ("ro", "rw")]
    if "/" in binds:
        raise ValueError("binding / would show the agent the whole host")

    def under_bind(path: str) -> bool:
        return any(path == b or path.startswith(b + "/") for b in binds)

    made: set[str] = set()
    for path, kind in sorted(mounts.items(), key=lambda item: (item[0].count("/"), item[0])):
        # Directories on the way to a mount point get 0755 explicitly: bwrap would copy the
        # host's modes, and a 0700 /root would hide a runtime installed beneath it.
        for parent in [str(p) for p in reversed(Path(path).parents)][1:]:
            if parent not in made and not under_bind(parent):
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        made.add(path)
        if kind == "dev":
            args += ["--dev", "/dev"]
        elif kind == "proc":
            args += ["--proc", "/proc"]
        elif kind == "tmpfs":
            args += ["--perms", "1777", "--size", str(policy.limits.tmp_bytes), "--tmpfs", "/tmp"]
        elif kind == "ro" and os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        else:
            # bwrap resolves a source as root, past any directory that would stop the agent:
            # a symlink inside the path would bind whatever it points to.
            if os.path.realpath(path) != path:
                raise ValueError(f"{path} is reached through a symlink; name its real path")
            args += ["--ro-bind" if kind == "ro" else "--bind", path, path]
    args += ["--chdir", policy.home or "/", "--", *command]
    return args


# --- the launch -----------------------------------------------------------------------------

class Launcher:
    extra_keep: frozenset[int] = frozenset()  # fds a forked launcher needs until it starts

    def __init__(self, policy: Policy, args: Args, report: Reporter) -> None:
        self.policy = policy
        self.args = args
        self.report = report

    def enter_namespaces(self, ppid: int) -> NoReturn:
        """Outer stage: exec bwrap, which runs this launcher again inside (--inside)."""
        a, policy, report = self.args, self.policy, self.report
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            report.fail(LaunchExit.NAMESPACES, "namespaces: bubblewrap (bwrap) is not on PATH")
        inner = [sys.executable, "-I", "-S", "-c", BOOT, str(PROJECT_ROOT), "--inside",
                 report.step("namespaces", namespace_ids)]
        if a.policy_fd is not None:
            inner += ["--policy-fd", str(a.policy_fd)]
        else:
            inner += ["--policy", a.policy_text or ""]
        if a.report_fd is not None:
            inner += ["--report-fd", str(a.report_fd)]
        cmd = report.step("namespaces", bwrap_argv, bwrap, policy, [*inner, "--", *a.argv])
        for fd in (a.policy_fd, a.report_fd, *policy.keep_fds):
            if fd is not None:
                os.set_inheritable(fd, True)
        try:
            die_with_parent(ppid)
        except Exception as exc:
            report.fail(LaunchExit.PARENT, str(exc))
        try:
            os.execv(bwrap, cmd)
        except OSError as exc:
            report.fail(LaunchExit.NAMESPACES, f"namespaces: cannot run {bwrap}: {exc}")

    def run(self) -> NoReturn:
        policy, a, report = self.policy, self.args, self.report
        layers = policy.layers
        ppid = os.getppid()
        keep = {0, 1, 2, *policy.keep_fds, *self.extra_keep}
        if a.report_fd is not None:
            keep.add(a.report_fd)
        outer = "namespaces" in layers and a.inside is None
        # The policy fd holds the agent's token: close it, unless bwrap's inner launcher is still
        # to read it.
        if outer and a.policy_fd is not None:
            keep.add(a.policy_fd)
        close_fds_except(keep)
        if outer:
            self.enter_namespaces(ppid)
        applied = report.applied
        if "namespaces" in layers:
            applied["namespaces"] = report.step("namespaces", self.inside)
        if "unshare" in layers:
            applied["unshare"] = report.step("unshare", unshare_ipc_and_net)
        # Build the Landlock rules and the seccomp filter while root can still open every path.
        ruleset = (report.step("landlock", build_landlock, policy, "namespaces" in layers)
                   if "landlock" in layers else None)
        routes = report.step(layers[0], open_forwards, policy) if policy.forwards else []
        if routes:
            applied["bridge"] = report.step(layers[0], hand_over, routes, report)
        bpf = (report.step("seccomp", self.make_filter, bool(routes))
               if "seccomp" in layers else None)
        if "rlimits" in layers:
            applied["rlimits"] = report.step("rlimits", set_rlimits, policy.limits)
        if "identity" in layers:
            assert policy.uid is not None and policy.gid is not None and policy.home is not None
            applied["identity"] = report.step("identity", become, policy.uid, policy.gid)
            report.step("identity", check_home, policy.home, policy.uid)
        try:
            self.tie_to_parent(ppid)
        except Exception as exc:
            report.fail(LaunchExit.PARENT, str(exc))
        os.umask(0o077)
        try:
            os.chdir(policy.home or "/")
            reach(a.argv[0], os.X_OK, "agent program")
        except OSError as exc:
            report.fail(LaunchExit.EXEC, f"exec: {exc}")
        if "nnp" in layers:
            applied["nnp"] = report.step("nnp", no_new_privs)
        if ruleset is not None:
            report.step("landlock", ruleset.restrict_self)
            applied["landlock"] = ruleset.describe()
        if bpf is not None:
            report.step("seccomp", bpf.load)
            applied["seccomp"] = {"arch": os.uname().machine, "rules": bpf.rules,
                                  "other_abis": "killed"}
            bpf.release()
        self.start()

    # The steps a forked launcher (kernel/proc/zygote.py) does its own way.

    def inside(self) -> dict[str, Any]:
        """The namespaces bwrap made, checked."""
        return check_inside(self.args.inside or "")

    def tie_to_parent(self, ppid: int) -> None:
        die_with_parent(ppid)

    def make_filter(self, inet: bool) -> seccomp.Filter:
        return seccomp.agent_filter(inet)

    def start(self) -> NoReturn:
        """Report, then become the agent's program."""
        a, policy, report = self.args, self.policy, self.report
        if a.report_fd is not None:
            os.set_inheritable(a.report_fd, False)  # closes at exec: the agent cannot forge it
        report.send({"event": "exec", "tier": policy.tier, "layers": report.applied,
                     "pid": os.getpid(), "ms": report.timings()})
        try:
            os.execve(a.argv[0], a.argv, policy.env)
        except OSError as exc:
            report.fail(LaunchExit.EXEC, f"exec {a.argv[0]}: {exc}")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    report = Reporter(None)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        report.fail(LaunchExit.POLICY, f"usage: {exc}")
    report.fd = args.report_fd
    try:
        policy = load_policy(args)
    except (OSError, ValueError) as exc:
        report.fail(LaunchExit.POLICY, f"policy: {exc}")
    report.tier = policy.tier
    Launcher(policy, args, report).run()


if __name__ == "__main__":
    main()
