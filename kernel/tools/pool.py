"""Persistent sandboxed tool processes and the worker threads that drive them.

A tool gets one worker thread per unit of its concurrency limit, each owning at most one tool
process (`userland/tools/runtime.py` running the tool's module) started through the sandbox
launcher on first use and kept for later calls: a call costs a frame each way over a socket,
not a process start. A call that overruns its deadline, is cancelled, crashes its process or
floods its output loses the process (SIGKILL to its whole process group); the next call starts
a fresh one. Workers never touch kernel state: results go back through `post`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.proc.sandbox import PROJECT_ROOT, Launch, Limits, Policy, default_readable
from kernel.tools.manifest import Manifest

log = logging.getLogger("kernel.tools")

# The runtime is loaded by path under its package name, so tools can import ToolError from it
# without the sandbox letting them list the project's directories.
RUNTIME = PROJECT_ROOT / "userland" / "tools" / "runtime.py"
HOST_BOOT = ("import sys,importlib.util as u;n='userland.tools.runtime';"
             "s=u.spec_from_file_location(n,sys.argv.pop(1));m=u.module_from_spec(s);"
             "sys.modules[n]=m;s.loader.exec_module(m);m.main()")
STDERR_CAP = 1 << 20  # a tool process's stderr log; writing past it kills it (RLIMIT_FSIZE)


@dataclass
class Outcome:
    """How a call ended, as the worker saw it."""

    ok: bool = False
    value: Any = None
    error: str | None = None  # the tool's own failure: returned to the caller as an error result
    stdout: str = ""
    tool_ms: float = 0.0
    code: str | None = None  # a syscall error instead: ETIMEDOUT | ECANCELED | EQUOTA | EIO


@dataclass(eq=False)
class Job:
    args: dict[str, Any]
    ctx: dict[str, Any]
    deadline: float  # time.monotonic()
    done: Callable[[Outcome], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], Any] | None = None  # set by backends that can stop a call early

    def cancel(self) -> None:
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()


class ToolProcess:
    """One sandboxed tool process and the kernel's end of its socket."""

    def __init__(self, policy: Policy, tool_file: str, log_path: Path,
                 read_files: bool = False) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        policy.keep_fds = (theirs.fileno(),)
        # A tool that reads callers' files keeps the one capability that reads past their
        # owners' permissions (agents have uids of their own); Landlock still bounds where.
        argv = [sys.executable, "-I", "-c", HOST_BOOT, str(RUNTIME),
                *(["--read-files"] if read_files else []), str(theirs.fileno()), tool_file]
        err = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with Launch(policy, argv) as launch:
                self.popen = subprocess.Popen(
                    launch.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env={},
                    pass_fds=launch.pass_fds, start_new_session=True)
                report = launch.report()
        finally:
            os.close(err)
            theirs.close()
        if not report.ok:
            self.kill()
            raise OSError(f"the sandbox refused to start the tool: {report.error}")
        self.layers = report.summary()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()
        self.sock.close()

    def exit_text(self) -> str:
        rc = self.popen.poll()
        if rc is None:
            return "still running"
        return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"

    def call(self, job: Job, cap: int) -> Outcome:
        data = json.dumps({"args": job.args, "ctx": job.ctx}).encode()
        self.sock.sendall(struct.pack(">I", len(data)) + data)
        head = self._read(4, job)
        if isinstance(head, Outcome):
            return head
        size = struct.unpack(">I", head)[0]
        if size > cap:
            return Outcome(code="EQUOTA", error=f"tool output of {size} bytes exceeds the "
                           f"tool's cap of {cap} bytes")
        body = self._read(size, job)
        if isinstance(body, Outcome):
            return body
        reply = json.loads(body)
        return Outcome(ok=bool(reply.get("ok")), value=reply.get("value"),
                       error=reply.get("error"), stdout=reply.get("stdout", ""),
                       tool_ms=float(reply.get("tool_ms", 0.0)))

    def _read(self, n: int, job: Job) -> bytes | Outcome:
        buf = bytearray()
        while len(buf) < n:
            left = job.deadline - time.monotonic()
            if job.cancelled.is_set():
                return Outcome(code="ECANCELED", error="cancelled")
            if left <= 0:
                return Outcome(code="ETIMEDOUT", error="the tool did not answer in time")
            # Short slices so a cancellation is seen within 50 ms; data wakes us at once.
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.05))
            if ready:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
                if not chunk:
                    self.popen.wait()
                    return Outcome(error=f"the tool process died ({self.exit_text()})")
                buf += chunk
        return bytes(buf)


class ToolPool:
    """The worker threads of one local tool; `submit` is called on the loop thread."""

    def __init__(self, manifest: Manifest, tool_file: str, make_policy: Callable[[], Policy],
                 log_dir: Path) -> None:
        self.manifest, self.tool_file = manifest, tool_file
        self.make_policy, self.log_dir = make_policy, log_dir
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.workers: list[threading.Thread] = []
        self.processes: dict[int, ToolProcess] = {}
        self.starts = 0  # tool processes started, for stats and tests

    def submit(self, job: Job, in_flight: int) -> None:
        """Queue `job`; `in_flight` counts it and the tool's other running calls."""
        if len(self.workers) < min(in_flight, self.manifest.concurrency):
            # Workers (and their processes) grow with demand up to the limit, and then stay.
            worker = threading.Thread(target=self._work, args=(len(self.workers),),
                                      name=f"tool-{self.manifest.name}-{len(self.workers)}",
                                      daemon=True)
            self.workers.append(worker)
            worker.start()
        self.jobs.put(job)

    def stop(self) -> None:
        for _ in self.workers:
            self.jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=5)
        for proc in list(self.processes.values()):
            proc.kill()
        self.processes.clear()

    def _work(self, slot: int) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                outcome = self._run(slot, job)
            except Exception as exc:
                log.exception("tool worker failed", extra={"tool": self.manifest.name})
                outcome = Outcome(code="EIO", error=f"tool worker failed: {exc}")
            job.done(outcome)

    def _run(self, slot: int, job: Job) -> Outcome:
        if job.cancelled.is_set():
            return Outcome(code="ECANCELED", error="cancelled")
        proc = self.processes.get(slot)
        if proc is None or not proc.alive():
            if proc is not None:
                proc.kill()
            try:
                proc = ToolProcess(self.make_policy(), self.tool_file,
                                   self.log_dir / f"{self.manifest.name}.{slot}.log",
                                   read_files=self.manifest.reads_caller_files)
            except OSError as exc:
                self.processes.pop(slot, None)
                log.error("tool process did not start", extra={"tool": self.manifest.name,
                                                               "reason": str(exc)})
                return Outcome(code="EIO", error=f"tool process did not start: {exc}")
            self.processes[slot] = proc
            self.starts += 1
        try:
            outcome = proc.call(job, self.manifest.output_bytes + 64 * 1024 + 1024)
        except (OSError, ValueError) as exc:
            outcome = Outcome(error=f"the tool process failed: {exc}")
        if outcome.code is not None or not proc.alive() or (
                outcome.error and outcome.error.startswith("the tool process")):
            # Whatever it was doing is not wanted: a fresh process serves the next call.
            proc.kill()
            self.processes.pop(slot, None)
        return outcome


def tool_policy(tier: str, home: Path, tool_file: str, *, uid: int | None = None,
                readable: tuple[str, ...] = (), writable: tuple[str, ...] = (),
                address_space: int = 2 << 30) -> Policy:
    """A tool process's policy: its runtime, the tool runtime and its own file readable; a
    scratch home; no inherited environment."""
    reads = default_readable(str(RUNTIME), tool_file, *readable)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return Policy(tier=tier, uid=uid, gid=uid, home=str(home), readable=reads,
                  writable=writable, env=env,
                  limits=Limits(address_space=address_space, open_files=128, processes=None,
                                file_size=STDERR_CAP))
