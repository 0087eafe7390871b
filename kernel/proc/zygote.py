"""The zygote: a warm, pre-imported agent template that forks each new agent (Android's zygote).

One zygote per agent interpreter, started by the kernel as root with an empty environment and
a control socket. It imports the launcher and the SDK's runtime (msgspec, pyzmq, the `sdk`
package), freezes its heap for the collector, and then only forks. It never reads an agent's
policy, argv or token: each request carries file descriptors (a memfd holding argv and policy,
the report pipe, stdout, stderr, the agent's own fds) and a header of non-secret numbers, so
nothing of one agent is ever in the template's memory for the next to inherit. The child reads
its memfd, applies its tier's layers exactly as the exec launcher does (kernel/proc/launch.py),
and then runs `sdk.runner` in-process instead of exec'ing Python.

Strict agents start from a *spare*: a child forked ahead, as pid 1 of a fresh pid namespace,
that has already made its other namespaces and the part of its root every agent shares
(kernel/proc/mounts.py `prepare`) and waits, holding nothing of any agent, for its start. The
zygote offers each spare to the kernel (its pid, a pidfd, its socket), which hands it the next
strict start directly and, once that start has reported, asks for the next spare; the spare
adds the agent's own paths (`finish`) and applies the remaining layers. A spare needs
open_tree(2) (Linux 5.2; Landlock needs 5.13) and CAP_SYS_CHROOT (setns into a mount
namespace): without them the zygote does not take strict agents, and the exec launcher
(bubblewrap) starts them.

The kernel side (`Zygote`) hands a start to the zygote and gets the agent's host pid back; the
zygote, the agents' parent, reports each exit status over the same socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, NoReturn

from kernel.proc.sandbox import PROJECT_ROOT, TIERS
from kernel.proc.signaller import start_helper

BOOT = ("import sys;sys.path.insert(0,sys.argv.pop(1));"
        "from kernel.proc.zygote import serve;serve()")
COVERED = ("strict", "standard")  # tiers with an agent uid; the others use the exec launcher
CLONE_NEWPID = 0x20000000
SPARE_NICE = 19  # a spare's while it waits for an agent (where it may set it back: CAP_SYS_NICE)
CAP_SYS_CHROOT, CAP_SYS_ADMIN, CAP_SYS_NICE = 18, 21, 23
MAX_FDS = 64  # fds one request may carry (policy, report, stdout, stderr, the agent's own)
MESSAGE = 65536
# Preloaded modules whose import reads the environment (the rings an agent inherited, their spin
# time): imported again in each child once its own environment is in place.
FRESH = ("sdk.ringpath",)
# The modules a forked agent finds imported (set in the template; read by tests).
PRELOADED: frozenset[str] = frozenset()


# --- inside the zygote ---------------------------------------------------------------------

def _preload() -> None:
    """What every agent imports before its own code: paid once, shared copy-on-write."""
    # The standard library the SDK and the reference agents (userland/agents) import: a
    # module imported after the fork is the agent's own memory, ~1 MB for a ReAct agent's.
    import argparse  # noqa: F401
    import asyncio  # noqa: F401
    import difflib  # noqa: F401
    import hashlib  # noqa: F401
    import hmac  # noqa: F401
    import json  # noqa: F401
    import pkgutil  # noqa: F401
    import random  # noqa: F401
    import re  # noqa: F401
    import secrets  # noqa: F401

    import msgspec  # noqa: F401
    import zmq  # noqa: F401

    import sdk
    import sdk.batch
    import sdk.families  # every syscall family's module: a connection imports them all
    import sdk.runner  # noqa: F401
    from kernel.proc import forward, landlock, launch, mounts, seccomp  # noqa: F401


def _send(sock: socket.socket, record: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(record).encode())
    except OSError:
        os._exit(0)  # the kernel is gone: so are we (and, by PDEATHSIG, our agents)


def serve() -> NoReturn:
    """The zygote's loop: argv = [control fd, kernel pid]."""
    import ctypes
    import gc
    import select

    control = socket.socket(fileno=int(sys.argv[1]))
    kernel_pid = int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the kernel
    if os.getppid() != kernel_pid:
        os._exit(1)
    _preload()
    from kernel.proc import mounts, seccomp
    from kernel.proc.launch import _launcher_paths, namespace_ids
    from kernel.proc.sandbox import default_readable

    base_path = list(sys.path)
    # Compiled once: a child loads its copy (libseccomp's context is plain memory).
    filters = {inet: seccomp.agent_filter(inet) for inet in (False, True)}
    host = namespace_ids()
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    host_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    # A spare reads its agent's paths in the host's mount namespace: open_tree(2), and setns
    # into a mount namespace (CAP_SYS_ADMIN and CAP_SYS_CHROOT). Without, bubblewrap.
    spares_ok = (mounts.can_open_trees() and _capable(CAP_SYS_ADMIN)
                 and _capable(CAP_SYS_CHROOT))
    tiers = [t for t in COVERED if "namespaces" not in TIERS[t] or spares_ok]
    # What every agent of this interpreter reads: a spare builds it before its agent is known.
    shared = mounts.shared(default_readable(python=sys.executable), _launcher_paths())
    # Children's read end of the life pipe sees POLLHUP once the zygote (its write end) is gone.
    life_r, life_w = os.pipe2(os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    global PRELOADED
    PRELOADED = frozenset(sys.modules)
    gc.freeze()  # the template's objects never move into a generation a child's gc touches
    zygote = {"control": control, "life": (life_r, life_w), "host": host,
              "base_path": base_path, "filters": filters, "host_mnt": host_mnt,
              "shared": shared, "nice": os.getpriority(os.PRIO_PROCESS, 0),
              "renice": _capable(CAP_SYS_NICE)}
    spares = Spares(libc, own_pidns, zygote, control)
    _send(control, {"ready": os.getpid(), "tiers": tiers})
    if "strict" in tiers:
        spares.offer()
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
                _reap(control, spares)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(control, MESSAGE, MAX_FDS)
            except OSError:
                os._exit(0)
            if not data:
                os._exit(0)  # the kernel closed its end
            header = None
            spared = False
            try:
                header = json.loads(data)
                if isinstance(header, dict) and "took" in header:
                    # The kernel gave the spare it held an agent: offer the next.
                    spares.took(int(header["took"]))
                    spared = True
                    continue
                tier, targets = _request(header, fds)
                if tier not in tiers:
                    raise ValueError(f"this zygote does not start {tier} agents")
                if "namespaces" in TIERS[tier]:
                    # The kernel held no spare (none made yet, or it died): one made now.
                    pid, pidfd = spares.fresh(data, fds)
                    spared = True
                else:
                    pid = _fork(tier, targets, fds, zygote)
                    # A pidfd made before the loop can reap the child: the kernel's handle on
                    # exactly this process, whatever happens to the pid.
                    pidfd = os.pidfd_open(pid)
                try:
                    socket.send_fds(control, [json.dumps({"id": header.get("id"),
                                                          "pid": pid}).encode()], [pidfd])
                except OSError:
                    os._exit(0)
                finally:
                    os.close(pidfd)
            except Exception as exc:
                _send(control, {"id": header.get("id") if isinstance(header, dict) else None,
                                "error": f"{type(exc).__name__}: {exc}"})
            finally:
                for fd in fds:
                    os.close(fd)
                if spared:
                    spares.offer()  # the next strict agent's, made while this one starts


def _reap(control: socket.socket, spares: Spares) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        spares.reaped(pid)
        # Every exit, a spare's too: the kernel knows whether it had given it an agent.
        _send(control, {"exit": pid, "status": status})


def _request(header: dict[str, Any], fds: list[int]) -> tuple[str, list[int]]:
    tier = header["tier"]
    targets = [int(t) for t in header["targets"]]
    if tier not in COVERED or len(fds) != 4 + len(targets):
        raise ValueError(f"bad request: tier {tier}, {len(fds)} fds for {len(targets)} targets")
    return tier, targets


def _fork(tier: str, targets: list[int], fds: list[int], zygote: dict[str, Any]) -> int:
    """A child for a tier without namespaces, started now."""
    pid = os.fork()
    if pid == 0:
        try:
            _child(tier, fds, targets, zygote)
        finally:
            os._exit(127)  # never back into the zygote's loop as a second zygote
    return pid


class Spares:
    """The namespaced tier's children, forked ahead (pid 1 of a pid namespace of their own)
    and prepared (`mounts.prepare`). The next one is offered to the kernel, which hands it
    the next strict start itself (its pid, a pidfd and its end of the spare's socket), so a
    start needs no round trip through the zygote; the kernel's `took` asks for another. A
    start the kernel sends here (it held none) gets one forked there and then."""

    def __init__(self, libc: Any, own_pidns: int, zygote: dict[str, Any],
                 control: socket.socket) -> None:
        self.libc = libc
        self.own_pidns = own_pidns
        self.zygote = zygote
        self.control = control
        self.offered = 0  # the pid of the spare the kernel holds, until it takes it or dies

    def _fork(self, ahead: bool) -> tuple[int, socket.socket]:
        """A new spare, preparing (in the background if `ahead`): its pid and our end of the
        socket it waits on."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if self.libc.unshare(CLONE_NEWPID) != 0:
                raise OSError(_errno(), "unshare(CLONE_NEWPID)")
            try:
                pid = os.fork()
            except BaseException:
                self.libc.setns(self.own_pidns, CLONE_NEWPID)
                raise
            if pid == 0:
                try:
                    mine.close()
                    _spare(theirs, self.zygote, ahead)
                finally:
                    os._exit(127)  # never back into the zygote's loop as a second zygote
            if self.libc.setns(self.own_pidns, CLONE_NEWPID) != 0:
                os._exit(1)  # a zygote whose next children would share this pid namespace
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return pid, mine

    def offer(self) -> None:
        """Give the kernel the next spare, unless it holds one."""
        if self.offered:
            return
        pid, mine = self._fork(ahead=True)
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(self.control, [json.dumps({"spare": pid}).encode()],
                            [pidfd, mine.fileno()])
        except OSError:
            os._exit(0)  # the kernel is gone
        finally:
            os.close(pidfd)
            mine.close()
        self.offered = pid

    def fresh(self, data: bytes, fds: list[int]) -> tuple[int, int]:
        """A spare forked now and given this request (the kernel's header and fds, as they
        came): its pid and pidfd, which the caller sends on and closes. (The kernel held no
        spare: none offered yet, or the offer still on its way, which it reads with this
        reply; either way `offer` afterwards leaves exactly one outstanding.)"""
        pid, mine = self._fork(ahead=False)
        try:
            socket.send_fds(mine, [data], fds)
        finally:
            mine.close()
        return pid, os.pidfd_open(pid)

    def took(self, pid: int) -> None:
        if pid == self.offered:
            self.offered = 0

    def reaped(self, pid: int) -> None:
        self.took(pid)  # an offered spare that died: the next request offers another


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _capable(cap: int) -> bool:
    """Whether this process has capability `cap` in its effective set."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _leave_zygote(zygote: dict[str, Any]) -> None:
    """A new child's first steps: none of the zygote's own lines stay open in it."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(zygote["life"][1])
    os.close(zygote["control"].detach())  # the kernel's line to the zygote, not ours


def _spare(sock: socket.socket, zygote: dict[str, Any], ahead: bool) -> NoReturn:
    """A strict agent-to-be: prepare what every agent shares, then wait for the request. A
    failed preparation is reported as the namespaces layer's failure once an agent asks.
    Made `ahead`, it is background work until then: the agent starting meanwhile comes first
    (where it can set its priority back after: raising a nice value needs no privilege,
    lowering it needs CAP_SYS_NICE, which a service may lack, and an agent left at 19 would
    run there)."""
    import ctypes

    from kernel.proc import mounts

    _leave_zygote(zygote)
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with it
    niced = ahead and zygote["renice"]
    if niced:
        os.setpriority(os.PRIO_PROCESS, 0, SPARE_NICE)
    zygote["null"] = os.open("/dev/null", os.O_RDONLY)  # the host's: the agent's stdin
    try:
        zygote["prepared"], zygote["unready"] = mounts.prepare(zygote["shared"]), None
    except Exception as exc:
        zygote["prepared"], zygote["unready"] = None, f"{type(exc).__name__}: {exc}"
    try:
        data, fds, _, _ = socket.recv_fds(sock, MESSAGE, MAX_FDS)
    except OSError:
        os._exit(0)
    if not data:
        os._exit(0)  # the zygote is gone, or stopped
    sock.close()
    if niced:
        os.setpriority(os.PRIO_PROCESS, 0, zygote["nice"])  # an agent's now
    try:
        tier, targets = _request(json.loads(data), fds)
    except (ValueError, KeyError, TypeError) as exc:
        os.write(2, f"agentos zygote: a spare refused its request: {exc}\n".encode())
        os._exit(127)
    _child(tier, fds, targets, zygote, spare=True)


def _child(tier: str, fds: list[int], targets: list[int], zygote: dict[str, Any],
           spare: bool = False) -> NoReturn:
    """The new agent, as root, holding the zygote's fds and this request's."""
    import fcntl

    from kernel.proc import launch
    from kernel.proc.sandbox import LaunchExit

    report = launch.Reporter(None)
    try:
        if not spare:
            _leave_zygote(zygote)
        # Everything this request brought, and what the child keeps of the zygote's, moves
        # above every number it must land on.
        floor = max([*targets, *fds, 2]) + 1
        life = fcntl.fcntl(zygote["life"][0], fcntl.F_DUPFD_CLOEXEC, floor)
        host_mnt = fcntl.fcntl(zygote["host_mnt"], fcntl.F_DUPFD_CLOEXEC, floor)
        prepared = zygote.get("prepared")
        if prepared is not None:
            prepared.mnt = fcntl.fcntl(prepared.mnt, fcntl.F_DUPFD_CLOEXEC, floor)
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in fds]
        memfd, report_fd, out, err, *keep = moved
        report.fd = report_fd
        null = zygote["null"] if spare else os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd, target in zip(keep, targets, strict=True):
            os.dup2(fd, target)
        text = b""
        while chunk := os.pread(memfd, 65536, len(text)):
            text += chunk
        line, _, policy_text = text.partition(b"\n")
        args = launch.Args(argv=json.loads(line), policy_text=policy_text.decode(),
                           report_fd=report_fd, inside=zygote["host"])
        policy = launch.load_policy(args, check_paths=not spare)
    except Exception as exc:
        report.fail(LaunchExit.POLICY, f"zygote: {exc}")
    report.tier = policy.tier
    if "namespaces" not in policy.layers:
        os.close(host_mnt)  # only the namespaces layer reads the host's mounts
        host_mnt = -1
    forked = _forked_class()(policy, args, report)
    forked.life = life
    forked.host_mnt = host_mnt
    forked.extra_keep = frozenset({life, host_mnt, prepared.mnt if prepared else -1} - {-1})
    forked.base_path = zygote["base_path"]
    forked.filters = zygote["filters"]
    forked.prepared = prepared
    forked.unready = zygote.get("unready")
    forked.run()


def _forked_class() -> type:
    from kernel.proc import launch, mounts

    class Forked(launch.Launcher):
        """The exec launcher's steps, with namespaces made in-process and no exec at the end."""

        life = -1
        host_mnt = -1
        base_path: list[str] = []
        filters: dict[bool, Any] = {}
        prepared: Any = None  # mounts.Prepared, a spare's
        unready: str | None = None

        def make_filter(self, inet: bool) -> Any:
            return self.filters[inet]

        def inside(self) -> dict[str, Any]:
            try:
                if self.prepared is None:
                    raise RuntimeError(f"preparing the sandbox: {self.unready}")
                made = mounts.finish(self.policy, launch._launcher_paths(), self.prepared,
                                     self.host_mnt)
            finally:
                os.close(self.host_mnt)  # the host's mount namespace: never the agent's
            launch.check_inside(self.args.inside or "")
            return made

        def tie_to_parent(self, ppid: int) -> None:
            import ctypes
            import select

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_SET_PDEATHSIG")
            # In a fresh pid namespace getppid() says 0: the life pipe says whether the zygote
            # (our parent) outlived the uid change that cleared PDEATHSIG.
            poller = select.poll()
            poller.register(self.life, select.POLLIN)
            if poller.poll(0):
                raise RuntimeError("the zygote died during launch")
            os.close(self.life)

        def start(self) -> NoReturn:
            a, policy, report = self.args, self.policy, self.report
            argv = a.argv
            if argv[:3] != [sys.executable, "-m", "sdk.runner"] or len(argv) < 4:
                report.fail(launch.LaunchExit.EXEC, f"zygote: cannot run {argv[:3]} in-process")
            # The uid change made us non-dumpable (root-owned /proc/self); an exec would have
            # reset that, so do what it does: the agent's own uid may read its own /proc.
            import ctypes

            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
            report.applied = {"zygote": True, **report.applied}  # `ps` says how it started
            report.send({"event": "exec", "tier": policy.tier, "layers": report.applied,
                         "pid": os.getpid(), "ms": report.timings()})
            if a.report_fd is not None:
                os.close(a.report_fd)
            os._exit(run_agent(argv[3:], policy.env, self.base_path))

    return Forked


def run_agent(argv: list[str], env: dict[str, str], base_path: list[str]) -> int:
    """What `python -m sdk.runner ARGV` would do, in this already warm interpreter: the
    agent's environment, path, stdio and a fresh RNG, then the runner; the exit status."""
    import atexit
    import importlib
    import io
    import random

    os.environ.clear()
    os.environ.update(env)
    sys.path[:] = [os.getcwd(), *[p for p in env.get("PYTHONPATH", "").split(":") if p],
                   *[p for p in base_path if p != str(PROJECT_ROOT)]]
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=unbuffered,
                                  line_buffering=not unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                  errors="backslashreplace")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    random.seed()  # register_at_fork does too; this says so where a reader looks
    # Modules that read the environment when imported saw the template's empty one.
    for name in FRESH:
        importlib.reload(sys.modules[name])
    atexit._clear()
    if os.getpid() == 1:
        # pid 1 of its namespace ignores signals it has no handler for, even SIGTERM from the
        # kernel: end the way bwrap's init reports a signal death (128 + N).
        signal.signal(signal.SIGTERM, lambda sig, _: os._exit(128 + sig))
    from sdk import runner

    try:
        code: object = runner.main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr, flush=True)
    return 1


# --- the kernel's side ---------------------------------------------------------------------

class ZygoteError(Exception):
    """The zygote cannot start this agent: the caller uses the exec launcher instead."""


class Zygote:
    """The kernel's handle on one zygote process (one per agent interpreter)."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.popen: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.ready = False
        self.tiers: tuple[str, ...] = ()  # what it starts, from its ready message
        self.said_tiers = False
        self.started = 0.0
        self.exits: dict[int, int] = {}
        self.replies: dict[int, dict[str, Any]] = {}
        # The spare it offered for the next strict start: pid, pidfd, our end of its socket.
        self.spare: tuple[int, int, socket.socket] | None = None
        self._dropped: set[int] = set()  # spares let go of, whose exits are nobody's
        self.lock = threading.RLock()
        self._next = 0
        self.failures = 0  # deaths in a row, each soon after its start
        self.retry_at = 0.0  # no restart before this (monotonic)

    def start(self) -> str | None:
        """Fork-exec the template (it becomes ready a few hundred ms later). An interpreter
        that cannot be run is not the kernel's failure: the error is returned (None when
        started), the zygote stays down and its agents go to the exec launcher, which
        refuses them with its own clear error."""
        self.started = time.monotonic()
        try:
            self.popen, mine = start_helper(self.python, BOOT)
        except OSError as exc:
            self.popen, self.sock, self.ready = None, None, False
            return f"{self.python}: {exc.strerror or exc}"
        self.sock, self.ready, self.said_tiers = mine, False, False
        self.exits.clear()
        self.replies.clear()
        self._drop_spare()
        self._dropped.clear()
        return None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None and self.sock is not None

    def wait_ready(self, timeout: float) -> bool:
        """Whether the template is ready, waiting up to `timeout` for it. Its "ready" message
        is read even at timeout 0: one that came after the first start's wait (a loaded
        machine) would otherwise never be read, and every later agent would go to the exec
        launcher."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not self.ready and self.alive():
                # At least a millisecond: a zero timeout makes the socket non-blocking, and
                # _pump takes its BlockingIOError for a lost zygote.
                if not self._pump(max(deadline - time.monotonic(), 0.001)):
                    break
        return self.ready

    def _pump(self, timeout: float | None) -> bool:
        """Read one message (waiting up to `timeout`; 0: only one already there); False on
        timeout, with nothing there, or a dead zygote."""
        assert self.sock is not None
        if timeout == 0:
            self.sock.setblocking(False)
        else:
            self.sock.settimeout(timeout)
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, MESSAGE, 2)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            data = b""
        if not data:
            self._lost()
            return False
        record = json.loads(data)
        if "ready" in record:
            self.ready = True
            self.tiers = tuple(record.get("tiers", ()))
        elif "exit" in record:
            pid = int(record["exit"])
            if self.spare is not None and self.spare[0] == pid:
                self._drop_spare()  # it died waiting: nobody's agent
            if pid in self._dropped:
                self._dropped.discard(pid)
            else:
                self.exits[pid] = int(record["status"])
        elif "spare" in record and len(fds) == 2:
            self._drop_spare()
            self.spare = (int(record["spare"]), fds[0], socket.socket(fileno=fds[1]))
            return True
        elif "id" in record:
            record["fds"] = fds
            self.replies[int(record["id"])] = record
            return True
        for fd in fds:
            os.close(fd)
        return True

    def _drop_spare(self) -> None:
        """Let go of the spare held (it exits once its socket closes: its exit is nobody's)."""
        if self.spare is not None:
            pid, pidfd, sock = self.spare
            self.spare = None
            os.close(pidfd)
            sock.close()
            if len(self._dropped) < 64:
                self._dropped.add(pid)

    def _take_spare(self, header: bytes, fds: list[int]) -> ZygoteChild | None:
        """Hand a strict start to the spare the zygote offered, if one is here and alive:
        no round trip through the zygote (`ZygoteChild.started` asks for the next)."""
        while self._pump(0):  # its offer, exits: whatever came since
            pass
        if self.spare is None or self.sock is None:
            return None
        pid, pidfd, sock = self.spare
        try:
            # Back to full priority even if it is still preparing (it sets that itself too,
            # once it reads this; the zygote's capabilities are the kernel's).
            os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0))
        except OSError:
            pass
        try:
            socket.send_fds(sock, [header], fds)
        except OSError:  # it died (the zygote reports its exit): the zygote starts this one
            self._drop_spare()
            return None
        self.spare = None
        sock.close()
        return ZygoteChild(self, pid, pidfd, spare=True)

    def took(self, pid: int) -> None:
        """Ask for the next spare: the one offered has done its agent's layers (made any
        sooner, the next spare's namespaces and mounts take the CPU and the kernel's mount
        lock from that agent's start: ~1.5 ms of a strict spawn here)."""
        with self.lock:
            if self.sock is not None:
                try:
                    self.sock.send(json.dumps({"took": pid}).encode())
                except OSError:
                    pass  # the zygote is gone, and the agent with it (PDEATHSIG)

    def _lost(self) -> None:
        """The zygote is gone: its agents died with it (PDEATHSIG)."""
        self.ready = False
        self._drop_spare()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.popen is not None:
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def spawn(self, tier: str, argv: list[str], policy_json: str, report_fd: int,
              stdout: int, stderr: int, keep: tuple[int, ...]) -> ZygoteChild:
        memfd = os.memfd_create("agentos-start", os.MFD_CLOEXEC)
        try:
            data = json.dumps(argv).encode() + b"\n" + policy_json.encode()
            while data:
                data = data[os.write(memfd, data):]
            with self.lock:
                if not self.ready or self.sock is None:
                    raise ZygoteError("the zygote is not ready")
                if "namespaces" in TIERS[tier]:
                    child = self._take_spare(
                        json.dumps({"tier": tier, "targets": list(keep)}).encode(),
                        [memfd, report_fd, stdout, stderr, *keep])
                    if child is not None:
                        return child
                    if self.sock is None:
                        raise ZygoteError("the zygote is gone")
                self._next += 1
                ident = self._next
                header = json.dumps({"id": ident, "tier": tier, "targets": list(keep)})
                try:
                    socket.send_fds(self.sock, [header.encode()],
                                    [memfd, report_fd, stdout, stderr, *keep])
                except OSError as exc:
                    self._lost()
                    raise ZygoteError(f"the zygote is gone: {exc}") from None
                deadline = time.monotonic() + 10
                while ident not in self.replies:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._pump(left):
                        raise ZygoteError("no answer from the zygote")
                reply = self.replies.pop(ident)
        finally:
            os.close(memfd)
        if "error" in reply or len(reply["fds"]) != 1:
            for fd in reply["fds"]:
                os.close(fd)
            raise ZygoteError(reply.get("error", "no pidfd with the reply"))
        return ZygoteChild(self, int(reply["pid"]), reply["fds"][0])

    def status(self, pid: int, timeout: float | None) -> int | None:
        """The wait status of a child the zygote reaped; -SIGKILL's once the zygote is gone
        (PDEATHSIG took its children with it); None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while pid not in self.exits:
                if self.sock is None:
                    return -signal.SIGKILL
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._pump(left)
            return os.waitstatus_to_exitcode(self.exits.pop(pid))

    def stop(self) -> None:
        self._drop_spare()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


class ZygoteChild:
    """What the process table needs of a Popen, for an agent the zygote forked."""

    def __init__(self, zygote: Zygote, pid: int, pidfd: int, spare: bool = False) -> None:
        self.zygote = zygote
        self.pid = pid
        self.pidfd = pidfd  # the kernel's to keep and close
        self.returncode: int | None = None
        self._spare = spare  # the zygote's offered spare: it makes the next once told

    def started(self) -> None:
        """Its launcher reported (layers applied, or refused): the zygote may make the next
        spare now."""
        if self._spare:
            self._spare = False
            self.zygote.took(self.pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.status(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.zygote.status(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"agent pid {self.pid}", timeout or 0)
        return self.returncode


class Zygotes:
    """The kernel's zygotes, one per agent interpreter, started at boot and restarted when one
    dies; a start the zygotes cannot take (another tier, a zygote down or restarting) returns
    None and goes to the exec launcher, which says so in the log."""

    READY_WAIT = 5.0  # the first start after boot waits this long for the template to warm up

    def __init__(self, log: Any, limit: int = 4) -> None:
        self.log = log
        self.limit = limit  # templates at most (config zygotes_max); each holds ~40 MB
        self.by_python: dict[str, Zygote] = {}

    def prestart(self, python: str) -> None:
        if python not in self.by_python:
            zygote = Zygote(python)
            error = zygote.start()
            if error is not None:
                self.log.warning("the zygote cannot start; agents start through the exec "
                                 "launcher", extra={"python": python, "error": error})
            self.by_python[python] = zygote

    def spawn(self, python: str, tier: str, argv: list[str], policy_json: str, report_fd: int,
              stdout: int, stderr: int, keep: tuple[int, ...]) -> ZygoteChild | None:
        if tier not in COVERED:
            return None
        zygote = self.by_python.get(python)
        if zygote is None and len(self.by_python) >= self.limit:
            self.log.info("no zygote for this interpreter (zygotes_max reached); this agent "
                          "starts through the exec launcher",
                          extra={"python": python, "zygotes": len(self.by_python)})
            return None
        if zygote is None:
            self.prestart(python)
            zygote = self.by_python[python]
        if not zygote.alive():
            now = time.monotonic()
            if now < zygote.retry_at:  # it keeps dying (say, an interpreter without pyzmq)
                self.log.info("the zygote is down; this agent starts through the exec launcher",
                              extra={"python": python, "retry_in": round(zygote.retry_at - now)})
                return None
            # Restarts back off from 1 s to a minute while it dies young; the exec launcher
            # starts agents meanwhile.
            young = now - zygote.started < 60
            zygote.failures = zygote.failures + 1 if young else 0
            zygote.retry_at = now + min(60.0, 2.0 ** zygote.failures) if young else 0.0
            self.log.warning("the zygote died; restarting it, and this agent starts through "
                             "the exec launcher", extra={"python": python, "zygote": zygote.pid,
                                                          "code": zygote.popen.returncode
                                                          if zygote.popen else None})
            zygote.stop()
            zygote.start()
            return None
        if not zygote.ready:
            waited = time.monotonic() - zygote.started
            if not zygote.wait_ready(max(0.0, self.READY_WAIT - waited)):
                self.log.warning("the zygote is not ready; this agent starts through the exec "
                                 "launcher", extra={"python": python, "zygote": zygote.pid})
                return None
        if tier not in zygote.tiers:
            if not zygote.said_tiers:  # a kernel without open_tree(2), say: once a start
                zygote.said_tiers = True
                self.log.warning("the zygote does not start this tier's agents here; they "
                                 "start through the exec launcher",
                                 extra={"python": python, "tier": tier,
                                        "zygote_tiers": list(zygote.tiers)})
            return None
        try:
            return zygote.spawn(tier, argv, policy_json, report_fd, stdout, stderr, keep)
        except ZygoteError as exc:
            self.log.warning("the zygote could not start an agent; the exec launcher does",
                             extra={"python": python, "error": str(exc)})
            return None

    def stop(self) -> None:
        for zygote in self.by_python.values():
            zygote.stop()
