"""Signalling every process of an agent's uid without forking the kernel.

`kill(-1, sig)` made *as* an agent's uid reaches every process of that uid, whatever session,
process group or pid namespace it moved to (sandbox.kill_uid). Something has to fork and drop
to the uid to make that call, and forking the kernel costs far more than the signal: its page
tables (a loaded model is gigabytes) are copied and every page of it is made copy-on-write, so
for a while after each fork the model's threads fault on every page they write. Measured at 64
agents ending their runs: 2.1 s of system time in the kernel's loop thread in a 15.6 s run,
and the model's two threads another 1.6 s.

So the kernel starts this small helper once (exec'd, not a fork of itself: a bare interpreter
of ~10 MB) and sends it `(uid, sig)` requests over a socket pair only the two of them hold; the
helper forks *itself* for each, the child drops to the uid and signals, and the helper answers
with the child's exit status. The helper stays root, so no agent can signal or trace it; it
dies with the kernel (PDEATHSIG) and when its socket closes. If it cannot be started or stops
answering, the caller forks the kernel as before (sandbox.kill_uid) and the log says why.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("kernel.proc")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BOOT = ("import sys;sys.path.insert(0,sys.argv.pop(1));"
        "from kernel.proc.signaller import serve;serve()")
REQUEST = struct.Struct("!II")  # uid, signal
REPLY = struct.Struct("!i")  # the child's exit status: 0, an errno, or -signal
# kill(-1) rounds: a process forked while one walked the task list meets the next (RLIMIT_NPROC
# bounds how many there can be).
ROUNDS = 4
TIMEOUT_S = 10.0
RESTART_AFTER_S = 10.0  # after a failure, the next start is tried no sooner than this


# --- inside the helper -----------------------------------------------------------------------

def serve() -> None:
    """The helper's loop: argv = [socket fd, kernel pid]."""
    import ctypes

    sock = socket.socket(fileno=int(sys.argv[1]))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the kernel
    if os.getppid() != int(sys.argv[2]):
        os._exit(1)
    while True:
        try:
            message = sock.recv(64)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)  # the kernel closed its end
        sock.send(REPLY.pack(_signal_uid(message)))


def _signal_uid(message: bytes) -> int:
    if len(message) != REQUEST.size:
        return 22  # EINVAL
    uid, sig = REQUEST.unpack(message)
    if uid == 0 or uid == os.getuid() or not 0 < sig < signal.NSIG:
        return 1  # EPERM: never every process of root's (or our own) uid
    return fork_and_signal(uid, sig)


def fork_and_signal(uid: int, sig: int) -> int:
    """Fork a child that drops to `uid` and calls kill(-1, sig); its exit status (0, or the
    errno that stopped it). The helper's way, and the kernel's own where the helper is down."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresuid(uid, uid, uid)
            for _ in range(ROUNDS):
                try:
                    os.kill(-1, sig)
                except ProcessLookupError:
                    break  # none left
        except OSError as exc:
            os._exit(exc.errno or 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --- the kernel's side -----------------------------------------------------------------------

def start_helper(python: str, boot: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Exec one of the kernel's helpers (this one, the zygote): `python -I -c boot` with the
    project root, its end of a SOCK_SEQPACKET pair and the kernel's pid as arguments, an empty
    environment, no stdio, a session of its own. Not a fork of the kernel: Popen execs through
    vfork where it can. Returns the process and the kernel's end; OSError if it cannot run."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        popen = subprocess.Popen(
            [python, "-I", "-c", boot, str(PROJECT_ROOT), str(theirs.fileno()),
             str(os.getpid())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, env={}, cwd="/", start_new_session=True)
    except OSError:
        mine.close()
        raise
    finally:
        theirs.close()
    return popen, mine


class Signaller:
    """The kernel's handle on the helper: started on first use, started again when it has died
    (not sooner than RESTART_AFTER_S after a start that failed or a helper that soon died)."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.lock = threading.Lock()
        self.popen: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.started_at = self.failed_at = float("-inf")
        self.starts = 0

    def signal_uid(self, uid: int, sig: int) -> bool:
        """Signal every process of `uid` through the helper; False (logged) where the helper
        could not, so the caller must."""
        status = self.request(uid, sig)
        if status is None:
            return False
        if status != 0:  # the helper is fine; its child could not (the caller's fork neither)
            log.warning("signalling uid %d failed in the helper's child (exit status %d)",
                        uid, status)
        return True

    def request(self, uid: int, sig: int) -> int | None:
        """The helper's answer for `(uid, sig)`: its child's exit status, or None where no
        helper could answer."""
        with self.lock:
            for _ in range(2):  # a helper that has died since its last request: one restart
                if self.sock is None and not self._start():
                    return None
                assert self.sock is not None
                try:
                    self.sock.send(REQUEST.pack(uid, sig))
                    reply = self.sock.recv(64)
                    if len(reply) != REPLY.size:
                        raise OSError(f"it answered {reply!r}")
                except OSError as exc:  # socket.timeout included
                    self._fail(str(exc) or type(exc).__name__)
                    continue
                return REPLY.unpack(reply)[0]
            return None

    def _start(self) -> bool:
        if time.monotonic() - self.failed_at < RESTART_AFTER_S:
            return False
        try:
            self.popen, mine = start_helper(self.python, BOOT)
        except OSError as exc:
            self.started_at = time.monotonic()
            self._fail(f"cannot start: {exc.strerror or exc}")
            return False
        mine.settimeout(TIMEOUT_S)
        self.sock = mine
        self.started_at = time.monotonic()
        self.starts += 1
        return True

    def _fail(self, why: str) -> None:
        log.warning("the signal helper failed (%s): the kernel forks itself to signal an "
                    "agent's uid until it runs again", why)
        if time.monotonic() - self.started_at < RESTART_AFTER_S:
            self.failed_at = time.monotonic()  # failing soon after its start: not again yet
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait()
            self.popen = None


HELPER = Signaller()
