"""Hostile agent forked from the zygote: reports what it inherited and tries its neighbour
(the test reads its memory from outside for the neighbour's token).

argv: NEIGHBOUR_HOST_PID NEIGHBOUR_AGENT_ID. Prints one JSON line, then idles until killed.
"""

import ctypes
import json
import os
import random
import signal
import socket
import stat
import sys

import sdk
from sdk import ringpath

neighbour_pid, neighbour_id = int(sys.argv[1]), int(sys.argv[2])
found: dict[str, object] = {}


def kind(fd: int) -> str | None:
    """What `fd` is (Landlock keeps /proc from the agent: fstat it is)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "pipe"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISCHR, "chr")):
        if test(mode):
            return name
    return "other"


found["fds"] = {fd: k for fd in range(1024) if (k := kind(fd)) is not None}
found["env"] = sorted(os.environ)
spec = ringpath._claim.spec  # the rings it inherited (sdk takes them out of the environment)
found["rings"] = [spec.submission, spec.completion, spec.submission_doorbell,
                  spec.completion_doorbell] if spec else []
found["token"] = os.environ.get("AGENTOS_TOKEN", "")
found["random"] = random.getrandbits(64)
found["urandom"] = os.urandom(8).hex()
found["pid"] = os.getpid()


def attempt(name: str, fn) -> None:
    try:
        fn()
        found[name] = "ok"
    except OSError as exc:
        found[name] = type(exc).__name__


attempt("kill", lambda: os.kill(neighbour_pid, signal.SIGKILL))


def read(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


attempt("mem", lambda: read(f"/proc/{neighbour_pid}/mem"))
attempt("environ", lambda: read(f"/proc/{neighbour_pid}/environ"))
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
rc = libc.ptrace(PTRACE_ATTACH, neighbour_pid, None, None)
found["ptrace"] = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
endpoint = os.environ["AGENTOS_ENDPOINT"].replace("ipc://", "")
other = endpoint.replace(f"/agents/{os.environ['AGENTOS_AGENT_ID']}/",
                         f"/agents/{neighbour_id}/")
with socket.socket(socket.AF_UNIX) as s:
    attempt("endpoint", lambda: s.connect(other))
with sdk.connect() as conn:
    conn.sys.null()
print(json.dumps(found), flush=True)
signal.pause()
