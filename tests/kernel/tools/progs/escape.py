"""Tries to leave its sandbox; reports what each attempt got."""

import os
import resource
import socket

MANIFEST = {"name": "escape", "description": "tries to escape", "concurrency": 1,
            "parameters": {"type": "object", "properties": {"state_dir": {"type": "string"}},
                           "required": ["state_dir"]}}


def attempt(fn):
    try:
        fn()
    except (OSError, ValueError) as exc:
        return f"blocked: {type(exc).__name__}"
    return "succeeded"


def run(args, ctx):
    state = args["state_dir"]

    def read(path):
        with open(path, "rb") as f:
            f.read(1)

    def write(path):
        with open(path, "w") as f:
            f.write("owned")

    def tcp():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(("127.0.0.1", 9))

    def udp():
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 9))

    return {
        "admin_token": attempt(lambda: read(os.path.join(state, "run", "admin.token"))),
        "secret_key": attempt(lambda: read(os.path.join(state, "secret.key"))),
        "database": attempt(lambda: read(os.path.join(state, "kernel.db"))),
        "write_state": attempt(lambda: write(os.path.join(state, "owned"))),
        "write_tmp": attempt(lambda: write("/tmp/agentos-tool-escape")),
        "proc_environ": attempt(lambda: read(f"/proc/{os.getppid()}/environ")),
        "tcp": attempt(tcp),
        "udp": attempt(udp),
        "kill_parent": attempt(lambda: os.kill(os.getppid(), 0)),
        "raise_rlimit": attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (
            resource.getrlimit(resource.RLIMIT_NOFILE)[1] + 1,) * 2)),
        "setuid": attempt(lambda: os.setuid(4242)),
        "chown": attempt(lambda: os.chown(os.environ["HOME"], 4242, 4242)),
        "home": attempt(lambda: write(os.path.join(os.environ["HOME"], "ok"))),
    }
