"""Runs one fixed script of syscalls and returns every outcome, over its rings or, with argv
`zmq`, over ZeroMQ only; also how many entries the kernel took from rings meanwhile."""

import os
import subprocess
import sys

import msgspec

import sdk
from sdk import abi, layout, ringpath

if sys.argv[1:] == ["zmq"]:
    ringpath.disable()

BIG = "x" * 20000  # more than a ring slot holds: the request goes over ZeroMQ


def outcome(fn, *args):
    try:
        value = fn(*args)
    except sdk.SyscallError as exc:
        return ["error", exc.code.name]
    return ["ok", msgspec.to_builtins(value)]


with sdk.connect() as conn:
    me = int(os.environ[layout.ENV_AGENT_ID])
    name = os.environ[layout.ENV_AGENT_NAME]
    before = conn.sys.stats().syscalls.get("ring.entries", 0)
    results = {
        "null": outcome(conn.sys.null),
        "info": outcome(lambda: (lambda i: [i.name == name, i.state])(conn.proc.info(me))),
        "send": outcome(conn.ipc.send, name, {"n": 1}),
        "recv": outcome(lambda: conn.ipc.recv(timeout=5).data),
        "send_big": outcome(conn.ipc.send, name, BIG),
        "recv_big": outcome(lambda: conn.ipc.recv(timeout=5).data == BIG),
        "recv_empty": outcome(lambda: conn.ipc.recv(timeout=0.05)),
        "kill_denied": outcome(conn.proc.kill, 1),
        "info_denied": outcome(conn.proc.info, me + 1000),
        "no_syscall": outcome(conn.call, "nope.nothing"),
        "rings_by_ticket": outcome(conn.call, "sys.rings"),  # users' processes only
        "bad_args": outcome(conn.call, "proc.info", abi.SpawnArgs(path="/x")),
        # Programs the agent runs inherit neither the ring spec nor (close-on-exec) the fds.
        "child_env": subprocess.run(
            [sys.executable, "-c", f"import os; print(os.environ.get({layout.ENV_RINGS!r}))"],
            capture_output=True, text=True).stdout.strip(),
    }
    # A batch: one doorbell for all its entries; one call's error stays with that call.
    with conn.batch() as b:
        batched = [b.sys.null(), b.proc.info(me), b.proc.kill(1), b.call("nope.nothing"),
                   b.ipc.send(name, BIG), b.ipc.recv(timeout=5)]
    results["batch"] = [outcome(p.result) for p in batched[:5]] + [
        outcome(lambda: batched[5].result().data == BIG)]
    results["batch"][1] = outcome(lambda: batched[1].result().name == name)
    after = conn.sys.stats().syscalls.get("ring.entries", 0)
    # More calls than the ring has slots: the rest go over ZeroMQ, all answered.
    with conn.batch() as b:
        many = [b.sys.null() for _ in range(300)]
    results["batch_overflow"] = sum(p.result() is None for p in many)
    conn.proc.exit({"results": results, "rings": conn.uses_rings, "entries": after - before})
