"""The process table: agents as OS processes the kernel spawns, watches, waits for and kills.

Rows live in SQLite (they survive the kernel); the live part (Popen, pidfd) lives here. Each
child is watched through a pidfd in the dispatch loop's poller, so an exit is noticed in the
same iteration it happens, with no SIGCHLD handler.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

import sdk
from kernel.access.tokens import Capability, Rule, rules_cover
from sdk import abi, layout

if TYPE_CHECKING:
    from kernel.core import Call, Kernel

log = logging.getLogger("kernel.proc")

LIVE_STATES = ("starting", "running")
# The project root, so an agent finds `sdk` even when agentos runs from a source checkout.
_SDK_ROOT = str(Path(sdk.__file__).resolve().parent.parent)
_ENV_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ")


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: with the pid, it names one process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def baseline_rules(agent_id: int, name: str | None = None) -> list[Rule]:
    """What every agent holds about itself: ping the kernel, report its own exit, read its own
    process entry and its own mailbox; with its name, its own memory space and files (keyed by
    name, so an agent restarted under the same name finds them again)."""
    own = [Rule("memory.*", f"mem/agent/{name}"), Rule("fs.*", f"fs/agent/{name}")] if name else []
    return [Rule("sys.*"), Rule("proc.exit"), Rule("proc.info", f"proc/{agent_id}"),
            Rule("ipc.recv"), *own]


def exit_status(returncode: int) -> int:
    """A shell-style status: the exit code, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(eq=False)
class Live:
    agent_id: int
    name: str
    popen: subprocess.Popen[bytes]
    pidfd: int
    exiting: bool = False


class ProcessTable:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.live: dict[int, Live] = {}
        self._by_fd: dict[int, Live] = {}
        self._waiters: dict[int, list[Call]] = {}

    # --- recovery ----------------------------------------------------------------------------

    def recover(self) -> None:
        """Crash-only start: agents the table still calls live belonged to a dead kernel. They
        are marked lost, and any still running (same pid, same start time) are killed."""
        rows = self.k.db.read("SELECT id, pid, pid_start FROM agents WHERE state IN (?, ?)",
                              LIVE_STATES)
        now = time.time()
        for agent_id, pid, pid_start in rows:
            if pid and pid_start and process_start_time(pid) == pid_start:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    log.warning("cannot kill orphaned agent",
                                extra={"agent": agent_id, "pid": pid})
            self.k.db.write("UPDATE agents SET state='lost', ended_at=? WHERE id=?",
                            (now, agent_id))
            self.k.db.write("DELETE FROM messages WHERE receiver=?", (agent_id,))
            self.k.audit.append("kernel", "lost", agent=agent_id, pid=pid)
        if rows:
            log.warning("agents lost by the previous kernel", extra={"count": len(rows)})

    # --- queries -----------------------------------------------------------------------------

    def is_live(self, agent_id: int) -> bool:
        live = self.live.get(agent_id)
        return live is not None and not live.exiting

    def live_by_name(self, name: str) -> Live | None:
        return next((lv for lv in self.live.values() if lv.name == name), None)

    def running_count(self) -> int:
        return len(self.live)

    def _row(self, agent_id: int, with_result: bool = True) -> abi.AgentInfo:
        rows = self.k.db.read(
            "SELECT id, name, state, path, pid, started_at, ended_at, exit_status, result "
            "FROM agents WHERE id=?", (agent_id,))
        if not rows:
            from kernel.core import Fault

            raise Fault(abi.ErrorCode.ENOENT, f"no agent {agent_id}")
        return self._info(rows[0], with_result)

    @staticmethod
    def _info(row: Any, with_result: bool) -> abi.AgentInfo:
        agent_id, name, state, path, pid, started, ended, status, result = row
        value = msgspec.msgpack.decode(result) if (with_result and result is not None) else None
        return abi.AgentInfo(id=agent_id, name=name, state=state, path=path, pid=pid,
                             started_at=started, ended_at=ended, exit_status=status, result=value)

    def info(self, agent_id: int) -> abi.AgentInfo:
        return self._row(agent_id)

    def ps(self) -> list[abi.AgentInfo]:
        rows = self.k.db.read(
            "SELECT id, name, state, path, pid, started_at, ended_at, exit_status, NULL "
            "FROM agents ORDER BY id")
        return [self._info(r, False) for r in rows]

    # --- spawn -------------------------------------------------------------------------------

    def spawn(self, caller_principal: str, cap: Capability, args: abi.SpawnArgs) -> int:
        from kernel.core import Fault
        from kernel.syscalls import known_op

        if self.k.draining:
            raise Fault(abi.ErrorCode.EAGAIN, "the kernel is shutting down")
        path = Path(args.path)
        if not path.is_absolute():
            raise Fault(abi.ErrorCode.EINVAL, f"path must be absolute: {args.path}")
        if not path.is_file():
            raise Fault(abi.ErrorCode.ENOENT, f"no such file: {args.path}")
        name = args.name or re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)[:64].lstrip("-.") or "agent"
        if self.live_by_name(name) is not None:
            raise Fault(abi.ErrorCode.EBUSY, f"an agent named {name!r} is already running")
        try:
            rules = [Rule.parse(text) for text in args.caps]
        except ValueError as exc:
            raise Fault(abi.ErrorCode.EINVAL, f"bad capability: {exc}") from None
        for rule in rules:
            if not known_op(rule.op):
                raise Fault(abi.ErrorCode.EINVAL, f"bad capability {rule}: no syscall {rule.op!r}")
        if not all(rules_cover(held, rules) for held in cap.rule_sets):
            raise Fault(abi.ErrorCode.EPERM, "cannot grant rights the caller does not hold: "
                        + ", ".join(map(str, rules)))

        cur = self.k.db.write(
            "INSERT INTO agents (name, path, argv, caps, spawned_by, state) VALUES (?,?,?,?,?,?)",
            (name, str(path), json.dumps(args.argv), json.dumps(args.caps), caller_principal,
             "starting"))
        agent_id = int(cur.lastrowid)
        granted = baseline_rules(agent_id, name) + rules
        token = self.k.authority.mint(f"agent:{agent_id}", granted)
        token_id = self.record_token(token)
        home = self.k.state.agent_dir(agent_id) / "home"
        env = {k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ}
        env.update({
            "HOME": str(home),
            "PYTHONPATH": _SDK_ROOT,
            "PYTHONUNBUFFERED": "1",
            layout.ENV_ENDPOINT: f"ipc://{self.k.state.socket_path}",
            layout.ENV_TOKEN: token,
            layout.ENV_AGENT_ID: str(agent_id),
            layout.ENV_AGENT_NAME: name,
        })
        argv = [sys.executable, "-m", "sdk.runner", str(path), *args.argv]
        append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        with (open(self.k.state.open_log(agent_id, "stdout", append), "ab") as out,
              open(self.k.state.open_log(agent_id, "stderr", append), "ab") as err):
            with self.k.identities.lock:
                try:
                    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=err, env=env, cwd=home, close_fds=True,
                                             start_new_session=True)
                except OSError as exc:
                    self.k.db.write("UPDATE agents SET state='failed', ended_at=? WHERE id=?",
                                    (time.time(), agent_id))
                    raise Fault(abi.ErrorCode.EIO, f"cannot start agent: {exc}") from None
                self.k.identities.register(popen.pid, agent_id)
        pidfd = os.pidfd_open(popen.pid)
        live = Live(agent_id, name, popen, pidfd)
        self.live[agent_id] = live
        self._by_fd[pidfd] = live
        self.k.poller.register(pidfd, 1)  # POLLIN: the process has exited
        self.k.db.write("UPDATE agents SET pid=?, pid_start=?, state='running', started_at=?, "
                        "token_id=? WHERE id=?",
                        (popen.pid, process_start_time(popen.pid), time.time(), token_id,
                         agent_id))
        self.k.audit.append(caller_principal, "spawn", agent=agent_id, name=name, path=str(path),
                            pid=popen.pid, rules=[str(r) for r in granted])
        log.info("spawned", extra={"agent": agent_id, "agent_name": name,
                                   "pid": popen.pid})
        return agent_id

    def record_token(self, token: str) -> str:
        cap = self.k.authority.verify(token)
        self.k.db.write("INSERT INTO tokens (id, parent, subject, issued_at, expires_at) "
                        "VALUES (?,?,?,?,?)",
                        (cap.token_id, cap.parent_id, cap.subject, cap.issued_at, cap.expires_at))
        return cap.token_id

    # --- exit, wait, kill --------------------------------------------------------------------

    def on_exit_fd(self, fd: int) -> None:
        live = self._by_fd.get(fd)
        if live is not None:
            self._reaped(live, live.popen.wait())

    def _reaped(self, live: Live, returncode: int) -> None:
        self._by_fd.pop(live.pidfd, None)
        self.k.poller.unregister(live.pidfd)
        os.close(live.pidfd)
        with self.k.identities.lock:
            self.k.identities.unregister(live.popen.pid)
        del self.live[live.agent_id]
        state = "killed" if returncode < 0 else "exited"
        status = exit_status(returncode)
        self.k.db.write("UPDATE agents SET state=?, exit_status=?, ended_at=? WHERE id=?",
                        (state, status, time.time(), live.agent_id))
        self.k.audit.append("kernel", "exit", agent=live.agent_id, status=status, state=state)
        log.info("agent ended", extra={"agent": live.agent_id, "state": state, "status": status})
        self.k.cancel_calls_of(live.agent_id)
        self.k.ipc.drop(live.agent_id)
        waiters = self._waiters.pop(live.agent_id, [])
        if waiters:
            info = self._row(live.agent_id)
            for call in waiters:
                self.k.reply(call, info)

    def wait(self, call: Call, args: abi.WaitArgs) -> Any:
        info = self._row(args.id)
        if args.id not in self.live:
            return info
        waiters = self._waiters.setdefault(args.id, [])
        waiters.append(call)
        call.on_cancel.append(lambda: waiters.remove(call) if call in waiters else None)
        return self.k.park(call, args.timeout_ms)

    def kill(self, caller_principal: str, agent_id: int, grace: float) -> None:
        live = self.live.get(agent_id)
        if live is None:
            self._row(agent_id)  # ENOENT for an agent that never existed
            from kernel.core import Fault

            raise Fault(abi.ErrorCode.ENOENT, f"agent {agent_id} is not running")
        self.k.audit.append(caller_principal, "kill", agent=agent_id, grace=grace)
        self._terminate(live, grace)

    def _terminate(self, live: Live, grace: float) -> None:
        self._signal(live, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        if grace > 0:
            self.k.after(grace, lambda: self._signal(live, signal.SIGKILL))

    def _signal(self, live: Live, sig: int) -> None:
        if self.live.get(live.agent_id) is not live:
            return  # already reaped
        try:
            os.killpg(live.popen.pid, sig)  # its whole process group: agents may fork
        except ProcessLookupError:
            pass

    def exit(self, agent_id: int, result: Any) -> None:
        """The agent declares itself done: record its result; it must exit within the grace."""
        blob = msgspec.msgpack.encode(result)
        if len(blob) > self.k.config.result_bytes:
            from kernel.core import Fault

            raise Fault(abi.ErrorCode.EINVAL, f"result is {len(blob)} bytes, over the "
                        f"{self.k.config.result_bytes}-byte limit")
        self.k.db.write("UPDATE agents SET result=? WHERE id=?", (blob, agent_id))
        live = self.live[agent_id]
        live.exiting = True
        self.k.after(self.k.config.kill_grace, lambda: self._signal(live, signal.SIGKILL))

    def logs(self, args: abi.LogsArgs) -> abi.LogChunk:
        self._row(args.id, with_result=False)
        try:
            with open(self.k.state.open_log(args.id, args.stream, os.O_RDONLY), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError("not a regular file")
                f.seek(args.offset)
                data = f.read(args.limit)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            data, size = b"", 0
        except OSError as exc:  # ELOOP from O_NOFOLLOW: something replaced the log
            from kernel.core import Fault

            self.k.audit.append("kernel", "log-tampered", agent=args.id, stream=args.stream,
                                error=str(exc))
            raise Fault(abi.ErrorCode.EPERM, f"log of agent {args.id} was tampered with") from None
        end = args.offset + len(data)
        return abi.LogChunk(data=data, offset=end, eof=args.id not in self.live and end >= size)

    # --- shutdown ----------------------------------------------------------------------------

    def terminate_all(self, grace: float) -> None:
        for live in list(self.live.values()):
            self._terminate(live, grace)

    def reap_blocking(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for live in list(self.live.values()):
            try:
                rc = live.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(live, signal.SIGKILL)
                rc = live.popen.wait()
            self._reaped(live, rc)

