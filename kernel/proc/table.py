"""The process table: agents as OS processes the kernel spawns, watches, waits for and kills.

Rows live in SQLite (they survive the kernel); the live part (Popen, pidfd, log pipes) lives
here. Each child is watched through a pidfd in the dispatch loop's poller, so an exit is noticed
in the same iteration it happens, with no SIGCHLD handler. Every agent starts through the
sandbox launcher (kernel/proc/spawner.py): in the standard and strict tiers it runs as a uid of
its own, which is then its identity and the handle to signal all its processes at once.
Restart policies (`no`, `on-failure`, `always`) bring an agent back under the same id with
exponential backoff until a crash-loop cap; a new kernel reconciles the table the same way.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.access import names
from kernel.access.rules import Capability
from kernel.call import Call, Fault
from kernel.proc import sandbox, venvs
from kernel.proc.logs import LogPump
from kernel.proc.sandbox import LAYER_EXIT, Report
from kernel.proc.spawner import AgentSpec, Extras, Sandboxes, SpawnHook
from kernel.proc.zygote import ZygoteChild, Zygotes
from sdk import abi
from sdk.tokens import Rule

if TYPE_CHECKING:

    from kernel.access.audit import AuditLog
    from kernel.access.guard import Guard
    from kernel.access.manager import AccessManager
    from kernel.call import Calls
    from kernel.config import Config
    from kernel.db import Database
    from kernel.doors.transport import Identities
    from kernel.llm.core import LLMCore
    from kernel.memory.manager import MemoryManager
    from kernel.poller import Poller
    from kernel.state import StateDir

log = logging.getLogger("kernel.proc")

LIVE_STATES = ("starting", "running", "suspended", "restarting")
_SQL_LIVE = "state IN ('starting', 'running', 'suspended', 'restarting')"
_INFO_COLUMNS = ("id, name, state, path, pid, started_at, ended_at, exit_status, {result}, "
                 "sandbox, layers, uid, restart, restarts, log_dropped, model, venv")
_LAYER_STATUSES = {int(status) for status in LAYER_EXIT.values()}
# The kernel's fds per running sandboxed agent: its pidfd, two log pipes, its endpoint's listener
# and connection, its HTTP door and egress listeners, two ring doorbells (the rings' mappings
# hold no fd: kernel/doors/ring.py map_shared; uid leases share one: kernel/proc/uids.py),
# measured by tests/kernel/proc/test_zygote.py; what the kernel holds besides; the agent count
# below which a boot warns that RLIMIT_NOFILE is the ceiling.
FDS_PER_AGENT = 9
FDS_BASE = 256
SCALE_AGENTS = 2000


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: with the pid, it names one process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def agent_pid(pid: int, uid: int | None) -> int:
    """The host pid of the agent itself: in the strict tier `pid` is bwrap's, and the agent
    (the first process of its uid) sits two levels down, under bwrap's init."""
    if uid is None:
        return pid
    level = [pid]
    for _ in range(3):
        for p in level:
            try:
                if os.stat(f"/proc/{p}").st_uid == uid:
                    return p
            except OSError:
                continue
        nxt = []
        for p in level:
            try:
                with open(f"/proc/{p}/task/{p}/children") as f:
                    nxt += [int(c) for c in f.read().split()]
            except OSError:
                continue
        level = nxt
    return pid


def baseline_rules(agent_id: int, name: str | None = None) -> list[Rule]:
    """What every agent holds about itself: ping the kernel, report its own exit, read its own
    process entry and its own mailbox; with its name, its own memory space and files (keyed by
    name, so the agent finds them again; names are owned: kernel/access/names.py)."""
    own = names.rights(name) if name else []
    return [Rule("sys.*"), Rule("proc.exit"), Rule("proc.info", f"proc/{agent_id}"),
            Rule("ipc.recv"), *own]


def exit_status(returncode: int) -> int:
    """A shell-style status: the exit code, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(eq=False)
class Live:
    agent_id: int
    name: str
    popen: subprocess.Popen[bytes] | ZygoteChild
    pidfd: int
    spec: AgentSpec
    uid: int | None = None  # its own uid (standard and strict tiers)
    home: str = ""
    socket_dir: Path | None = None
    pumps: list[LogPump] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    exiting: bool = False  # it called proc.exit
    finished_off: bool = False  # SIGKILLed by the kernel after proc.exit's grace ran out
    stopping: bool = False  # killed on purpose: never restarted
    suspended: bool = False

    @property
    def own_pidns(self) -> bool:
        """Whether it is pid 1 of a pid namespace of its own (a strict agent the zygote
        started): every process of the agent is in that namespace and dies with it, since
        the kernel kills a namespace's processes when its pid 1 exits."""
        return isinstance(self.popen, ZygoteChild) and "namespaces" in sandbox.TIERS[
            self.spec.tier]


class ProcessTable:
    """Rooms it names: the switchboard (`calls`), access (grants, tokens), the models (a spawn
    names one; a suspended agent's generations pause), and the kernel's poller, on which it
    registers each agent's pidfd and log pipes (the loop hands them back to `on_exit_fd`).
    What other rooms keep per agent is theirs to drop: `exit_hooks` run at each exit (a restart
    follows or not), `end_hooks` once the agent is over for good."""

    def __init__(self, *, access: AccessManager, audit: AuditLog, calls: Calls, config: Config,
                 db: Database, guard: Guard, identities: Identities, llm: LLMCore,
                 memory: MemoryManager, poller: Poller, state: StateDir) -> None:
        self.access, self.audit, self.calls, self.config, self.db = access, audit, calls, config, db
        self.guard, self.identities, self.llm = guard, identities, llm
        self.poller, self.state = poller, state
        self.live: dict[int, Live] = {}
        self._by_fd: dict[int, Live] = {}
        self._pumps: dict[int, tuple[Live, LogPump]] = {}
        self._waiters: dict[int, dict[Call, None]] = {}  # keyed by call: O(1) cancel
        self._pending: dict[int, AgentSpec] = {}  # waiting out a restart backoff
        self._streak: dict[int, int] = {}  # restarts in a row, each soon after its start
        self.sandboxes = Sandboxes(audit=audit, config=config, db=db, state=state)
        self.names = names.Names(db=db, guard=guard, memory=memory)
        # Other subsystems' per-agent resources (the syscall rings): a spawn hook adds fds and
        # environment to an agent's start, a reap hook releases them when it ends.
        self.spawn_hooks: list[SpawnHook] = []
        self.reap_hooks: list[Callable[[int], None]] = [self.sandboxes.release]
        # Run once an agent is running (its launcher reported): the kernel drops what it only
        # held to pass on.
        self.start_hooks: list[Callable[[int], None]] = []
        self.exit_hooks: list[Callable[[int], None]] = []  # its calls in flight are cancelled
        self.end_hooks: list[Callable[[int], None]] = []  # its mailbox goes
        # Each agent holds a pidfd, two pipes and an endpoint: lift the soft fd limit.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard != resource.RLIM_INFINITY:
            room = (hard - FDS_BASE) // FDS_PER_AGENT
            (log.warning if room < SCALE_AGENTS else log.info)(
                "open-file limit", extra={"nofile": hard, "agents_it_holds": room,
                                          "raise_with": "LimitNOFILE= or ulimit -Hn"})
        # Warm templates the sandboxed agents fork from (kernel/proc/zygote.py).
        self.zygotes: Zygotes | None = None
        if config.zygote and self.sandboxes.can_isolate:
            self.zygotes = Zygotes(log, config.zygotes_max)
            self.zygotes.prestart(config.agent_python or sys.executable)

    # --- recovery ----------------------------------------------------------------------------

    def recover(self) -> None:
        """Crash-only start: agents the table still calls live belonged to a dead kernel. Any
        still running are killed (every process of their uid; or same pid and start time);
        then each is restarted if its policy says so, else marked lost."""
        rows = self.db.read(f"SELECT id, pid, pid_start, uid, restart FROM agents "
                              f"WHERE {_SQL_LIVE}")
        now = time.time()
        for agent_id, pid, pid_start, uid, restart in rows:
            if uid is not None and self.sandboxes.can_isolate:
                if self.sandboxes.claim_lost(agent_id, uid):
                    sandbox.kill_uid(uid)
                else:
                    log.warning("a lost agent's uid is another kernel's now; left alone",
                                extra={"agent": agent_id, "uid": uid})
                    uid = None
            if pid and pid_start and process_start_time(pid) == pid_start:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    log.warning("cannot kill orphaned agent",
                                extra={"agent": agent_id, "pid": pid})
            self.audit.append("kernel", "lost", agent=agent_id, pid=pid, restart=restart)
            if restart in ("always", "on-failure"):
                self.db.write("UPDATE agents SET state='restarting' WHERE id=?", (agent_id,))
                self._pending[agent_id] = self._spec(agent_id)
                self.calls.after(0, lambda a=agent_id: self._restart(a))
                continue
            self.db.write("UPDATE agents SET state='lost', ended_at=? WHERE id=?",
                            (now, agent_id))
            self.db.write("DELETE FROM messages WHERE receiver=?", (agent_id,))
            self.sandboxes.ended(agent_id, uid)
        if rows:
            log.warning("agents lost by the previous kernel", extra={"count": len(rows)})

    def refused_peer(self, uid: int, pid: int) -> None:
        """The ZAP handler refused a connection (called on its thread): audit it on the loop."""
        if self.calls.post_fd >= 0:  # not once the kernel has stopped
            self.calls.post(lambda: self.guard.deny(
                f"uid:{uid}", "connect", None, f"pid {pid} is no running agent and no user"))

    # --- queries -----------------------------------------------------------------------------

    def is_live(self, agent_id: int) -> bool:
        live = self.live.get(agent_id)
        return live is not None and not live.exiting

    def live_by_name(self, name: str) -> Live | None:
        return next((lv for lv in self.live.values() if lv.name == name), None)

    def agent_named(self, name: str) -> int | None:
        """The id of the running agent called `name`, if one is."""
        live = self.live_by_name(name)
        return None if live is None else live.agent_id

    def _name_busy(self, name: str) -> bool:
        """Running, or waiting out a restart backoff under that name."""
        return (self.live_by_name(name) is not None
                or any(spec.name == name for spec in self._pending.values()))

    def running_count(self) -> int:
        return len(self.live)

    def _row(self, agent_id: int, with_result: bool = True) -> abi.AgentInfo:
        rows = self.db.read(
            f"SELECT {_INFO_COLUMNS.format(result='result')} FROM agents WHERE id=?",
            (agent_id,))
        if not rows:
            raise Fault(abi.ErrorCode.ENOENT, f"no agent {agent_id}")
        return self._info(rows[0], with_result)

    def _info(self, row: Any, with_result: bool) -> abi.AgentInfo:
        (agent_id, name, state, path, pid, started, ended, status, result, tier, layers, uid,
         restart, restarts, dropped, model, venv) = row
        value = msgspec.msgpack.decode(result) if (with_result and result is not None) else None
        live = self.live.get(agent_id)
        if live is not None:
            dropped += sum(p.dropped for p in live.pumps)
        summary = Report(**json.loads(layers)).summary() if layers else None
        return abi.AgentInfo(id=agent_id, name=name, state=state, path=path, pid=pid,
                             started_at=started, ended_at=ended, exit_status=status, result=value,
                             sandbox=tier, layers=summary, uid=uid, restart=restart,
                             restarts=restarts, log_dropped=dropped, model=model, venv=venv)

    def info(self, agent_id: int) -> abi.AgentInfo:
        return self._row(agent_id)

    def ps(self) -> list[abi.AgentInfo]:
        rows = self.db.read(
            f"SELECT {_INFO_COLUMNS.format(result='NULL')} FROM agents ORDER BY id")
        return [self._info(r, False) for r in rows]

    def _spec(self, agent_id: int) -> AgentSpec:
        name, path, argv, caps, tier, limits, restart, group, by, model, venv = self.db.read(
            "SELECT name, path, argv, caps, sandbox, limits, restart, grp, spawned_by, model, "
            "venv FROM agents WHERE id=?", (agent_id,))[0]
        return AgentSpec(agent_id, name, path, json.loads(argv), json.loads(caps),
                         tier or "none", json.loads(limits or "{}"), restart or "no", group, by,
                         model, venv)

    # --- spawn -------------------------------------------------------------------------------

    def spawn(self, caller_principal: str, cap: Capability, args: abi.SpawnArgs) -> int:

        if self.calls.draining:
            raise Fault(abi.ErrorCode.EAGAIN, "the kernel is shutting down")
        if not os.path.isabs(args.path):
            raise Fault(abi.ErrorCode.EINVAL, f"path must be absolute: {args.path}")
        # The agent is its code's real path from here on: every start checks that it still is.
        path = Path(os.path.realpath(args.path))
        parent = self._caller_live(caller_principal)
        if not path.is_file():
            raise Fault(abi.ErrorCode.ENOENT, f"no such file: {args.path}")
        self._check_code(caller_principal, str(path))
        name = args.name or re.sub(r"[^A-Za-z0-9_.-]", "-", Path(args.path).stem)[:64].lstrip(
            "-.") or "agent"
        if self._name_busy(name):
            raise Fault(abi.ErrorCode.EBUSY, f"an agent named {name!r} is already running")
        self.names.check(caller_principal, cap, name)
        # The syscall checked the privilege group (`AccessManager.check_group`) already.
        self.access.check_grant(cap, self.access.rules(args.caps))
        tier = self.sandboxes.tier(args.sandbox, parent.spec.tier if parent else None)
        limits = self.sandboxes.limits(args.limits, parent.spec.limits if parent else None)
        if args.model is not None and not self.llm.known(args.model):
            raise Fault(abi.ErrorCode.ENOENT, f"no model {args.model!r} (served: "
                        f"{self.llm.served()})")
        venv = self._venv(args.venv, parent)

        cur = self.db.write(
            "INSERT INTO agents (name, path, argv, caps, spawned_by, state, sandbox, limits, "
            "restart, grp, model, venv) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, str(path), json.dumps(args.argv), json.dumps(args.caps), caller_principal,
             "starting", tier, json.dumps(limits), args.restart, args.group, args.model, venv))
        agent_id = int(cur.lastrowid)
        self.names.claim(name, caller_principal, agent_id)
        spec = AgentSpec(agent_id, name, str(path), list(args.argv), list(args.caps), tier,
                         limits, args.restart, args.group, caller_principal, args.model, venv)
        self._start(spec, caller_principal)
        return agent_id

    def _caller_live(self, principal: str) -> Live | None:
        kind, _, ident = principal.partition(":")
        return self.live.get(int(ident)) if kind == "agent" else None

    def _venv(self, requested: str | None, parent: Live | None) -> str | None:
        """The virtual environment a new agent runs in, checked (kernel/proc/venvs.py). An
        agent may hand its child only its own: one it names would become readable to it."""
        if requested is None:
            return None
        if parent is not None and requested != parent.spec.venv:
            raise Fault(abi.ErrorCode.EPERM, "an agent may start a child only in its own "
                        "virtual environment")
        return venvs.check(requested, self.config, self.state.root).path

    def _check_code(self, spawner: str, path: str) -> None:
        """Run at every start, the first and each restart: `path` (the code's real path when
        the agent was spawned) must still be its real path, so no directory on it was swapped
        for a symlink since; and an agent may start only code it can read itself (its own
        code's directory or its home), because the child's code directory becomes readable
        to the child. A restart checks against the spawner's places even after it ended."""
        if os.path.realpath(path) != path:
            raise Fault(abi.ErrorCode.EPERM, f"{path} is now reached through a symlink: the "
                         "agent's code moved since it was spawned")
        if not os.path.isfile(path):  # removed, or in a home locked when its agent ended
            raise Fault(abi.ErrorCode.ENOENT, f"{path}: the agent's code is gone")
        kind, _, ident = spawner.partition(":")
        if kind != "agent":
            return  # users and the kernel's other doors may start any code
        rows = self.db.read("SELECT path FROM agents WHERE id=?", (int(ident),))
        # The spawner's own path was stored resolved and is not resolved again: a symlink
        # swapped into it since must not widen what its children may reach.
        roots = [os.path.dirname(rows[0][0]) if rows else "",
                 str(self.state.agents / ident / "home")]
        if not any(root and (path == root or path.startswith(root.rstrip("/") + "/"))
                   for root in roots):
            raise Fault(abi.ErrorCode.EPERM, f"{path} is outside what {spawner} can read")

    def _start(self, spec: AgentSpec, by: str) -> Live:
        """Mint the agent's token and start it in its sandbox; on refusal the row says
        `failed` and a typed Fault says why."""
        agent_id = spec.agent_id
        try:
            self._check_code(spec.spawned_by, spec.path)
        except Fault as exc:
            self._failed_start(agent_id, by, exc.message, None)
            raise
        granted = baseline_rules(agent_id, spec.name) + [Rule.parse(text) for text in spec.caps]
        token, token_id = self.access.grant_agent(agent_id, granted, spec.group)
        uid = None
        if "identity" in sandbox.TIERS[spec.tier]:
            uid = self.sandboxes.allocate_uid(
                agent_id, {lv.uid for lv in self.live.values() if lv.uid is not None})
        extras = Extras()
        t0 = time.perf_counter()
        try:
            for hook in self.spawn_hooks:
                hook(agent_id, extras)
            prepared = self.sandboxes.prepare(spec, token, uid, extras)
        except Exception as exc:
            self._failed_start(agent_id, by, str(exc), None)
            raise
        launch = prepared.launch
        t1 = time.perf_counter()
        pumps: list[LogPump] = []
        child_ends: list[int] = []
        append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            for stream in ("stdout", "stderr"):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                child_ends.append(write_end)
                pumps.append(LogPump(agent_id, stream, read_end,
                                     functools.partial(self.state.open_log, agent_id, stream,
                                                       append), prepared.log_bytes))
            with self.identities.lock:
                if uid is not None:
                    self.identities.register_uid(uid, agent_id)
                popen: subprocess.Popen[bytes] | ZygoteChild | None = None
                if self.zygotes is not None:
                    popen = self.zygotes.spawn(
                        launch.agent_argv[0], spec.tier, launch.agent_argv,
                        launch.policy_json, launch.report_w, child_ends[0],
                        child_ends[1], launch.policy.keep_fds)
                if popen is None:
                    popen = subprocess.Popen(launch.argv, pass_fds=launch.pass_fds,
                                             stdin=subprocess.DEVNULL, stdout=child_ends[0],
                                             stderr=child_ends[1], env={}, cwd="/",
                                             start_new_session=True)
                if uid is None:
                    self.identities.register(popen.pid, agent_id)
        except OSError as exc:
            with self.identities.lock:
                if uid is not None:
                    self.identities.unregister_uid(uid)
            for pump in pumps:
                pump.close()
            launch.close()
            self._release(agent_id, prepared.socket_dir)
            self._failed_start(agent_id, by, f"cannot start agent: {exc}", None)
            raise Fault(abi.ErrorCode.EIO, f"cannot start agent: {exc}") from None
        finally:
            for fd in child_ends:
                os.close(fd)
        t2 = time.perf_counter()
        try:
            report = launch.report(timeout=15)
        except Exception as exc:  # never leave a started process untracked
            report = Report(False, spec.tier, error=f"reading the launcher's report: {exc}")
        finally:
            if isinstance(popen, ZygoteChild):
                popen.started()
        launch.close()
        log.debug("start timings", extra={"agent": agent_id, "zygote": isinstance(
            popen, ZygoteChild), "prepare_ms": round((t1 - t0) * 1000, 1), "fork_ms": round(
            (t2 - t1) * 1000, 1), "report_ms": round((time.perf_counter() - t2) * 1000, 1),
            "layers_ms": report.ms})
        pidfd = popen.pidfd if isinstance(popen, ZygoteChild) else os.pidfd_open(popen.pid)
        live = Live(agent_id, spec.name, popen, pidfd, spec, uid,
                    prepared.policy.home or "", prepared.socket_dir, pumps)
        if not report.ok:
            self._kill_now(live)
            popen.wait()
            os.close(live.pidfd)
            self._cleanup(live)
            code = (abi.ErrorCode.ENOSYS if report.status in _LAYER_STATUSES
                    else abi.ErrorCode.EPERM)
            self._failed_start(agent_id, by, report.error, report)
            raise Fault(code, f"agent {agent_id} could not start: {report.error}")
        self.live[agent_id] = live
        self.sandboxes.adopt(agent_id, report.listeners)  # its door and proxy, served here
        for hook in self.start_hooks:
            hook(agent_id)
        self._by_fd[live.pidfd] = live
        self.poller.register(live.pidfd, 1)  # POLLIN: the process has exited
        for pump in pumps:
            self._pumps[pump.fd] = (live, pump)
            self.poller.register(pump.fd, 1)
        layers = json.dumps({"ok": True, "tier": report.tier, "layers": report.layers})
        pid = agent_pid(popen.pid, uid)
        self.db.write("UPDATE agents SET pid=?, pid_start=?, state='running', started_at=?, "
                        "token_id=?, uid=?, layers=?, ended_at=NULL, exit_status=NULL, "
                        "result=NULL WHERE id=?",
                        (pid, process_start_time(pid), time.time(), token_id, uid, layers,
                         agent_id))
        self.audit.append(by, "spawn", agent=agent_id, name=spec.name, path=spec.path,
                            pid=pid, uid=uid, sandbox=report.summary(),
                            rules=[str(r) for r in granted])
        log.info("spawned", extra={"agent": agent_id, "agent_name": spec.name,
                                   "pid": pid, "sandbox": report.summary()})
        return live

    def _failed_start(self, agent_id: int, by: str, error: str, report: Report | None) -> None:
        layers = None
        if report is not None:
            layers = json.dumps({"ok": False, "tier": report.tier, "layers": report.layers,
                                 "status": report.status, "error": report.error})
        self.db.write("UPDATE agents SET state='failed', ended_at=?, layers=? WHERE id=?",
                        (time.time(), layers, agent_id))
        self.audit.append(by, "spawn-failed", agent=agent_id, error=error)
        self.access.agent_ended(agent_id)  # the token minted for it must not outlive it
        log.warning("agent could not start", extra={"agent": agent_id, "error": error})

    # --- exit, restart, wait, kill -----------------------------------------------------------

    def on_exit_fd(self, fd: int) -> None:
        """A watched fd is ready: an agent's pidfd (it exited) or one of its log pipes."""
        live = self._by_fd.get(fd)
        if live is not None:
            self._reaped(live, live.popen.wait())
            return
        entry = self._pumps.get(fd)
        if entry is not None and not entry[1].pump():
            self._close_pump(entry[1])

    def _close_pump(self, pump: LogPump) -> None:
        if not pump.closed:
            if self._pumps.pop(pump.fd, None) is not None:  # a failed start never polled it
                self.poller.unregister(pump.fd)
            pump.close()

    def _release(self, agent_id: int, socket_dir: Path | None) -> None:
        if socket_dir is not None:
            self.sandboxes.unbind_endpoint(socket_dir)
        for hook in self.reap_hooks:
            try:
                hook(agent_id)
            except Exception:
                log.exception("reap hook failed", extra={"agent": agent_id})

    def _cleanup(self, live: Live) -> int:
        """Whatever the agent held besides its row: every process of its uid, its identity,
        its log pipes (drained first), its endpoint, other subsystems' resources. Returns the
        bytes its logs dropped."""
        with self.identities.lock:
            if live.uid is not None:
                self.identities.unregister_uid(live.uid)
            else:
                self.identities.unregister(live.popen.pid)
        if live.uid is not None and not live.own_pidns:
            # A double-forked child outlives nothing. (One in the agent's own pid namespace
            # died with its pid 1, before the exit was seen: there is nowhere else for it.)
            sandbox.kill_uid(live.uid)
        dropped = 0
        for pump in live.pumps:
            if not pump.closed:
                pump.pump(budget=1 << 24)
            dropped += pump.dropped
            if pump.capped:
                self.audit.append("kernel", "log-capped", agent=live.agent_id,
                                    stream=pump.stream, cap=pump.cap, dropped=pump.dropped)
            self._close_pump(pump)
        self._release(live.agent_id, live.socket_dir)
        if live.suspended:
            self.llm.pause(f"agent:{live.agent_id}", False)
        return dropped

    def _reaped(self, live: Live, returncode: int) -> None:
        self._by_fd.pop(live.pidfd, None)
        self.poller.unregister(live.pidfd)
        os.close(live.pidfd)
        del self.live[live.agent_id]
        dropped = self._cleanup(live)
        if "namespaces" in sandbox.TIERS[live.spec.tier] and 128 < returncode <= 128 + 64:
            returncode = 128 - returncode  # bwrap exits 128+N when its child died of signal N
        if live.finished_off and returncode == -signal.SIGKILL:
            self.audit.append("kernel", "finished-off", agent=live.agent_id,
                                grace=self.config.kill_grace)
            returncode = 0
        state = "killed" if returncode < 0 else "exited"
        status = exit_status(returncode)
        delay = self._restart_delay(live, status)
        if delay == -1:
            state = "failed"
            self.audit.append("kernel", "crash-loop", agent=live.agent_id,
                                restarts=self._streak.pop(live.agent_id, 0) - 1)
        elif delay is not None:
            state = "restarting"
        elif (self.calls.draining and not live.stopping and live.spec.restart != "no"
              and not (live.spec.restart == "on-failure" and status == 0)):
            state = "restarting"  # stopped by the shutdown: the next kernel restarts it
        self.db.write("UPDATE agents SET state=?, exit_status=?, ended_at=?, "
                        "log_dropped=log_dropped+? WHERE id=?",
                        (state, status, time.time(), dropped, live.agent_id))
        self.audit.append("kernel", "exit", agent=live.agent_id, status=status, state=state,
                            restart_in=delay if delay is not None and delay >= 0 else None)
        log.info("agent ended", extra={"agent": live.agent_id, "state": state, "status": status})
        for hook in self.exit_hooks:
            hook(live.agent_id)
        self.access.agent_ended(live.agent_id)  # a restart is granted a fresh token
        if delay is not None and delay >= 0:
            self._pending[live.agent_id] = live.spec
            self.calls.after(delay, lambda: self._restart(live.agent_id))
            return
        self._streak.pop(live.agent_id, None)
        self._ended(live.agent_id)

    def _ended(self, agent_id: int) -> None:
        """The agent is over for good: its mailbox and LLM accounting go, its home is kept or
        removed, its waiters get its final row."""
        for hook in self.end_hooks:
            hook(agent_id)
        self.llm.agent_ended(f"agent:{agent_id}")
        self.sandboxes.ended(agent_id)
        waiters = self._waiters.pop(agent_id, {})
        if waiters:
            info = self._row(agent_id)
            for call in waiters:
                self.calls.reply(call, info)

    def _restart_delay(self, live: Live, status: int) -> float | None:
        """Seconds until the agent's restart, None for no restart, -1 for a crash loop."""
        policy = live.spec.restart
        if (policy == "no" or live.stopping or self.calls.draining
                or (policy == "on-failure" and status == 0)):
            return None
        cfg = self.config
        streak = 0 if time.monotonic() - live.started >= cfg.restart_window else (
            self._streak.get(live.agent_id, 0))
        if streak >= cfg.restart_max:
            self._streak[live.agent_id] = streak + 1
            return -1
        self._streak[live.agent_id] = streak + 1
        return min(cfg.restart_backoff_max, cfg.restart_backoff * 2 ** streak)

    def _restart(self, agent_id: int) -> None:
        spec = self._pending.pop(agent_id, None)
        if spec is None:
            return  # killed while waiting
        if self.calls.draining:
            self.db.write("UPDATE agents SET state='killed' WHERE id=?", (agent_id,))
            self._ended(agent_id)
            return
        self.db.write("UPDATE agents SET restarts=restarts+1 WHERE id=?", (agent_id,))
        try:
            self._start(spec, "kernel")
        except Fault as exc:
            log.warning("restart failed", extra={"agent": agent_id, "error": exc.message})
            self._ended(agent_id)
            return
        self.audit.append("kernel", "restart", agent=agent_id)

    def wait(self, call: Call, args: abi.WaitArgs) -> Any:
        info = self._row(args.id)
        if args.id not in self.live and args.id not in self._pending:
            return info
        waiters = self._waiters.setdefault(args.id, {})
        waiters[call] = None
        call.on_cancel.append(lambda: waiters.pop(call, None))
        return self.calls.park(call, args.timeout_ms)

    def kill(self, caller_principal: str, agent_id: int, grace: float) -> None:
        live = self.live.get(agent_id)
        if live is None:
            self._row(agent_id)  # ENOENT for an agent that never existed
            if self._pending.pop(agent_id, None) is not None:
                self.audit.append(caller_principal, "kill", agent=agent_id, grace=grace)
                self.db.write("UPDATE agents SET state='killed' WHERE id=?", (agent_id,))
                self._streak.pop(agent_id, None)
                self._ended(agent_id)
                return
            raise Fault(abi.ErrorCode.ENOENT, f"agent {agent_id} is not running")
        self.audit.append(caller_principal, "kill", agent=agent_id, grace=grace)
        live.stopping = True
        self._terminate(live, grace)

    def _terminate(self, live: Live, grace: float) -> None:
        self._signal(live, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        if grace > 0:
            self.calls.after(grace, lambda: self._signal(live, signal.SIGKILL))

    def _signal(self, live: Live, sig: int) -> None:
        if self.live.get(live.agent_id) is not live:
            return  # already reaped
        if sig == signal.SIGKILL:
            self._kill_now(live)
            return
        self._send(live, sig)
        if live.suspended and sig == signal.SIGTERM:
            self._send(live, signal.SIGCONT)  # a stopped process would never see the TERM

    def _send(self, live: Live, sig: int) -> None:
        if live.uid is not None:
            if live.own_pidns and sig in (signal.SIGTERM, signal.SIGKILL):
                # Its pid 1, by pidfd: a SIGKILL takes the namespace with it, a SIGTERM ends
                # the runner, whose exit does. kill_uid would scan every process on the host
                # for each agent (a shutdown of 2,000 agents: O(N^2), 96 s).
                try:
                    signal.pidfd_send_signal(live.pidfd, sig)
                except OSError:
                    pass  # already gone
                return
            # Every process of its uid, whatever session or pid namespace it moved to.
            sandbox.kill_uid(live.uid, sig)
            return
        try:
            os.killpg(live.popen.pid, sig)  # its whole process group: agents may fork
        except ProcessLookupError:
            pass

    def _kill_now(self, live: Live) -> None:
        self._send(live, signal.SIGKILL)
        try:
            os.kill(live.popen.pid, signal.SIGKILL)  # the strict tier's bwrap, a root process
        except ProcessLookupError:
            pass

    def suspend(self, caller_principal: str, agent_id: int) -> None:
        """SIGSTOP every process of the agent and hold its queued LLM requests."""
        live = self._running(agent_id)
        if live.suspended:
            raise Fault(abi.ErrorCode.EBUSY, f"agent {agent_id} is already suspended")
        self._send(live, signal.SIGSTOP)
        live.suspended = True
        self.llm.pause(f"agent:{agent_id}", True)
        self.db.write("UPDATE agents SET state='suspended' WHERE id=?", (agent_id,))
        self.audit.append(caller_principal, "suspend", agent=agent_id)

    def resume(self, caller_principal: str, agent_id: int) -> None:
        live = self._running(agent_id)
        if not live.suspended:
            raise Fault(abi.ErrorCode.EBUSY, f"agent {agent_id} is not suspended")
        self._send(live, signal.SIGCONT)
        live.suspended = False
        self.llm.pause(f"agent:{agent_id}", False)
        self.db.write("UPDATE agents SET state='running' WHERE id=?", (agent_id,))
        self.audit.append(caller_principal, "resume", agent=agent_id)

    def _running(self, agent_id: int) -> Live:
        live = self.live.get(agent_id)
        if live is None or live.exiting:
            self._row(agent_id)
            raise Fault(abi.ErrorCode.ENOENT, f"agent {agent_id} is not running")
        return live

    def exit(self, agent_id: int, result: Any) -> None:
        """The agent declares itself done: record its result; it must exit within the grace."""
        blob = msgspec.msgpack.encode(result)
        if len(blob) > self.config.result_bytes:
            raise Fault(abi.ErrorCode.EINVAL, f"result is {len(blob)} bytes, over the "
                         f"{self.config.result_bytes}-byte limit")
        self.db.write("UPDATE agents SET result=? WHERE id=?", (blob, agent_id))
        live = self.live[agent_id]
        live.exiting = True
        self.calls.after(self.config.kill_grace, lambda: self._finish_off(live))

    def _finish_off(self, live: Live) -> None:
        """An agent that reported its result but is still exiting after the grace (a slow
        interpreter shutdown on a loaded machine): the kernel ends it. It declared itself
        done, so this kill is cleanup, not its failure: `_reaped` records status 0."""
        if self.live.get(live.agent_id) is live:
            live.finished_off = True
            self._signal(live, signal.SIGKILL)

    def logs(self, args: abi.LogsArgs) -> abi.LogChunk:
        self._row(args.id, with_result=False)
        try:
            with open(self.state.open_log(args.id, args.stream, os.O_RDONLY), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError("not a regular file")
                f.seek(args.offset)
                data = f.read(args.limit)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            data, size = b"", 0
        except OSError as exc:  # ELOOP from O_NOFOLLOW: something replaced the log
            self.audit.append("kernel", "log-tampered", agent=args.id, stream=args.stream,
                                error=str(exc))
            raise Fault(abi.ErrorCode.EPERM, f"log of agent {args.id} was tampered with") from None
        end = args.offset + len(data)
        ended = args.id not in self.live and args.id not in self._pending
        return abi.LogChunk(data=data, offset=end, eof=ended and end >= size)

    # --- shutdown ----------------------------------------------------------------------------

    def terminate_all(self, grace: float) -> None:
        """Stop every agent for shutdown. Agents with a restart policy stay `restarting` in the
        table, so the next kernel brings them back (`recover`)."""
        self._pending.clear()
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
        if self.zygotes is not None:
            self.zygotes.stop()

