"""Hostile agent run by the real kernel: reaches for the kernel's secrets, other agents and the
network, and prints one JSON line of outcomes (None means the attack worked).

argv[1] is a JSON object of targets the test knows about."""

import ctypes
import errno
import json
import os
import signal
import socket
import sys

import sdk

libc = ctypes.CDLL(None, use_errno=True)
targets = json.loads(sys.argv[1])


def attempt(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return None


def read(path):
    with open(path, "rb") as f:
        f.read(1)


def write(path):
    with open(path, "wb") as f:
        f.write(b"pwned")


def listing(path):
    """What it sees in the directory, or the errno that stopped it."""
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def connect_unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)


def connect_tcp(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))


def ptrace(pid):
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    libc.ptrace(17, pid, None, None)


out = {
    "read_key": attempt(read, targets["key"]),
    "read_db": attempt(read, targets["db"]),
    "read_admin_token": attempt(read, targets["admin_token"]),
    "list_state": listing(targets["state"]),
    "read_other_home": attempt(read, targets["other_home"] + "/notes"),
    "write_other_home": attempt(write, targets["other_home"] + "/pwned"),
    "read_other_environ": attempt(read, f"/proc/{targets['other_pid']}/environ"),
    "tcp_connect": attempt(connect_tcp, targets["tcp_port"]),
    "connect_admin_socket": attempt(connect_unix, targets["admin_socket"]),
    "connect_other_endpoint": attempt(connect_unix, targets["other_socket"]),
    "ptrace_kernel": attempt(ptrace, targets["kernel_pid"]),
    "kill_kernel": attempt(os.kill, targets["kernel_pid"], signal.SIGKILL),
}
# A token that leaked from another agent, presented on this agent's own connection.
try:
    with sdk.connect(token=targets["stolen_token"], timeout=10) as conn:
        conn.sys.null()
    out["stolen_token"] = None
except sdk.SyscallError as exc:
    out["stolen_token"] = exc.code.name
print(json.dumps(out), flush=True)
