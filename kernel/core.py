"""The kernel: boot, the dispatch loop, and the path every syscall takes.

The loop is `poll → each door takes a batch → run timers → commit → deliver replies`. One
thread owns the doors (kernel/doors/) and the database; handlers either answer at once or park
the call (`PENDING`) and answer later from an event (a message arrives, an agent exits, a
timer fires).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from typing import Any

import msgspec
import zmq

from kernel.access.approvals import Approvals
from kernel.access.audit import AuditLog
from kernel.access.guard import Guard
from kernel.access.manager import AccessManager
from kernel.access.rules import Capability
from kernel.access.tokens import TokenAuthority
from kernel.call import PENDING, Call, Caller, Fault, LocalRoute
from kernel.config import Config
from kernel.db import Database, StorageFault, storage_fault
from kernel.doors import Door
from kernel.doors.egress import Egress
from kernel.doors.http.agentdoor import AgentDoor
from kernel.doors.http.bridge import Bridge, HttpDoor
from kernel.doors.remote import Remote
from kernel.doors.ringdoor import RingDoor
from kernel.doors.rings import Rings
from kernel.doors.router import RouterDoor
from kernel.doors.transport import Identities
from kernel.ipc import Mailboxes
from kernel.llm.core import LLMCore
from kernel.memory.manager import MemoryManager
from kernel.notify import Notifier
from kernel.poller import Poller
from kernel.proc.table import ProcessTable
from kernel.state import StateDir, StateError, write_private
from kernel.storage.manager import StorageManager
from kernel.switchboard import Switchboard
from kernel.syscalls import SYSCALLS
from kernel.tools.core import ToolManager
from sdk import abi

log = logging.getLogger("kernel")



class Kernel:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.notifier = Notifier()
        self.started_at = time.time()
        self._stop_requests = 0
        # Every call in flight and the loop's hand-offs: the one service the rooms get.
        self.calls = Switchboard(config.agent_calls_in_flight, config.user_calls_in_flight)
        self._callers: dict[str, Caller] = {}  # principal -> Caller (immutable, so shared)
        self.http: Any = None  # the HTTP front end's server thread, when --http is given
        # The doors, in the order the loop polls them: those with sockets or fds of the
        # loop's, and those that publish a batch's replies (`Door.overrides`).
        self._polled: list[Door] = []
        self._flushed: list[Door] = []
        self._door_of: dict[type, Door] = {}  # route type -> the door its replies go out by

    # --- boot and shutdown -------------------------------------------------------------------

    def boot(self) -> None:
        """Recover state and open the front door; after this the kernel answers syscalls."""
        self.state.traversable = os.geteuid() == 0  # agents of their own uids pass through
        self.state.open()
        self.db = Database(self.state.db_path)
        self.audit = AuditLog(self.db, self.state.root / "audit.head",
                              self.state.root / "audit.verified")
        c, calls = self.config, self.calls
        self.access = AccessManager(config=c, db=self.db, audit=self.audit,
                                    authority=TokenAuthority(self.state.secret_key()),
                                    key_path=self.state.key_path,
                                    admin_token=self.state.admin_token_path)
        self.guard = Guard(access=self.access, audit=self.audit, config=c)
        self.identities = Identities({os.geteuid(), 0, *self.config.allowed_uids},
                                     range(self.config.agent_uid_base,
                                           self.config.agent_uid_base
                                           + self.config.agent_uid_count))
        # Rooms name what they use (the switchboard, `calls`, and the rooms they need), never
        # the kernel; the process table and the doors register fds on the loop's poller.
        self.poller = Poller()  # zmq sockets by zmq_poll, every plain fd by one epoll set
        self.memory = MemoryManager(calls=calls, config=c, db=self.db, state=self.state)
        self.llm = LLMCore(calls=calls, config=c)
        self.procs = ProcessTable(access=self.access, audit=self.audit, calls=calls, config=c,
                                  db=self.db, guard=self.guard, identities=self.identities,
                                  llm=self.llm, memory=self.memory, poller=self.poller,
                                  state=self.state)
        self.identities.on_refused = self.procs.refused_peer
        self.ipc = Mailboxes(calls=calls, config=c, db=self.db, procs=self.procs)
        self.procs.exit_hooks.append(self.cancel_calls_of)
        self.procs.end_hooks.append(self.ipc.drop)
        self.rings = Rings(self)
        self.ringdoor = RingDoor(self)
        self.procs.spawn_hooks.append(self.rings.on_spawn)
        self.procs.start_hooks.append(self.rings.on_started)
        self.procs.reap_hooks.append(self.rings.drop)
        self.remote = Remote(self)
        self.bridge = Bridge(self)  # every HTTP front end's calls, the agents' own doors too
        self.agentdoor = AgentDoor(self)
        self.access.agent_named = self.procs.agent_named
        self.egress = Egress(self)  # each agent's proxy to the network it was granted
        self.approvals = Approvals(access=self.access, audit=self.audit, calls=calls, config=c,
                                   db=self.db)
        self.storage = StorageManager(access=self.access, approvals=self.approvals,
                                      audit=self.audit, calls=calls, config=c, db=self.db,
                                      memory=self.memory, procs=self.procs, state=self.state)
        self.tools = ToolManager(approvals=self.approvals, audit=self.audit, calls=calls,
                                 config=c, guard=self.guard, procs=self.procs, state=self.state)
        self.procs.recover()
        self.access.recover()
        self.db.commit()

        self.front = RouterDoor(self)
        # Each sandboxed agent's own endpoint is bound on the ROUTER at its start, and its own
        # OpenAI door and egress proxy opened beside it.
        self.procs.sandboxes.attach(router=self.front.socket, agentdoor=self.agentdoor,
                                    egress=self.egress)
        if self.config.listen:
            self.remote.open(self.config.listen)
        if self.config.rings:
            self.ringdoor.open()
        for door in (self.front, self.rings, self.ringdoor, self.remote, HttpDoor(self.bridge)):
            self._open_door(door)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self._wake_r, zmq.POLLIN)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # Other threads (model workers) hand work to the loop through `calls.post`.
        self.poller.register(self.calls.post_fd, zmq.POLLIN)
        self.llm.start()
        self.memory.start()
        self.storage.start()
        self.tools.start()
        self._start_http()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        self.access.write_admin_token()
        self.db.commit()
        # What boot built (modules, managers, tables) lives as long as the kernel: out of the
        # collector's full passes, which any agent's allocations set off, so a pass scans only
        # what came after and no longer pauses every caller for tens of ms.
        gc.freeze()
        log.info("kernel ready", extra={"state_dir": str(self.state.root), "pid": os.getpid(),
                                        "socket": str(self.state.socket_path),
                                        "sandbox": self.procs.sandboxes.describe()})
        self.notifier.notify("READY=1", f"MAINPID={os.getpid()}",
                             "STATUS=answering syscalls")

    def _start_http(self) -> None:
        """The HTTP front end (`--http HOST:PORT`), off by default; its address goes to
        `run/http` so clients of port 0 find it."""
        if not self.config.http:
            return
        from kernel.doors.http.server import HttpServer

        try:
            self.http = HttpServer(self, self.config.http)
            self.http.start_serving()
        except (OSError, ValueError) as exc:
            raise StateError(str(exc)) from None
        host = self.http.server.config.host
        write_private(self.state.run / "http", f"{host}:{self.http.port()}\n".encode())

    def _open_door(self, door: Door) -> None:
        if door.overrides("on_ready"):
            self._polled.append(door)
        if door.overrides("flush"):
            self._flushed.append(door)
        if door.routes is not None:
            self._door_of[door.routes] = door

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self._stop_requests += 1

    def run(self) -> int:
        """Boot, serve until SIGTERM/SIGINT, drain, and return the exit status."""
        self.boot()
        try:
            self._serve()
        finally:
            self._shutdown()
        return 0

    def _serve(self) -> None:
        drain_deadline = None
        while True:
            if self._stop_requests and not self.calls.draining:
                self.calls.draining = True
                drain_deadline = time.monotonic() + self.config.drain_timeout
                log.info("draining", extra={"agents": self.procs.running_count()})
                self.notifier.notify("STOPPING=1", "STATUS=draining")
                self.procs.terminate_all(self.config.kill_grace)
            if self.calls.draining:
                if self._stop_requests > 1:
                    self.procs.terminate_all(0)  # a second signal: no more grace
                if self.procs.running_count() == 0 or time.monotonic() >= drain_deadline:
                    return
            self.step(self._poll_timeout())

    def step(self, timeout_ms: int | None) -> None:
        """One loop iteration; the unit the watchdog vouches for."""
        ready = self.rings.wait(self.poller, timeout_ms)  # spins on busy rings, else polls
        for door in self._polled:
            door.on_ready(ready)
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if self.calls.post_fd in ready:
            self.calls.run_posted()
        for fd in ready:
            if isinstance(fd, int) and fd not in (self._wake_r, self.calls.post_fd):
                self.procs.on_exit_fd(fd)
        self.calls.run_timers()
        self.flush()
        self.notifier.watchdog()

    def _poll_timeout(self) -> int:
        horizon = 1.0
        if self.notifier.watchdog_interval is not None:
            horizon = min(horizon, self.notifier.watchdog_interval)
        due = self.calls.next_timer()
        if due is not None:
            horizon = min(horizon, due - time.monotonic())
        ring_wait = self.rings.wait_hint()
        if ring_wait is not None:
            horizon = min(horizon, ring_wait)
        return max(0, int(horizon * 1000))

    def _shutdown(self) -> None:
        if self.http is not None:
            self.http.close()
        self.agentdoor.stop()
        self.egress.stop()
        self.llm.stop()
        self.memory.stop()
        self.tools.stop()
        self.calls.run_posted()
        self.procs.terminate_all(0)
        self.procs.reap_blocking(timeout=5.0)
        for call in self.calls.all_parked():
            self.calls.fail(call, abi.ErrorCode.ECANCELED, "the kernel is shutting down")
        self.access.close()
        self.flush()
        for door in (self.ringdoor, self.rings, self.remote):
            door.close()
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.calls.close()
        self.front.close()
        self.poller.close()
        self.audit.close()
        self.db.close()
        self.state.close()
        log.info("kernel stopped", extra={"syscalls": sum(self.calls.counts.values())})
        self.notifier.close()

    # --- dispatch ----------------------------------------------------------------------------

    def submit(self, route: bytes, user: str, data: bytes) -> bool:
        """A request's bytes from an attested principal, whichever door they came through (the
        ROUTER, a ring, the tcp:// endpoint): decode, then `execute`. False if `data` is not a
        request."""
        try:
            req = abi.decode_request(data)
        except abi.AbiError as exc:
            self.calls.send_error(route, abi.request_id_of(data), abi.ErrorCode.EINVAL, str(exc))
            return False
        self.calls.counts[req.call] += 1
        if len(data) > self.config.max_message_bytes:
            self.calls.send_error(route, req.id, abi.ErrorCode.EINVAL,
                             f"{req.call}: request of {len(data)} bytes is over this kernel's "
                             f"limit of {self.config.max_message_bytes} (max_message_bytes)")
            return True
        entry = SYSCALLS.get(req.call)
        if entry is None:
            self.calls.send_error(route, req.id, abi.ErrorCode.ENOSYS, f"no syscall {req.call!r}")
            return True
        caller = self._caller(user)
        if caller is None:
            self.calls.send_error(route, req.id, abi.ErrorCode.EPERM, f"{user} is not running")
            return True
        self.execute(Call(route, req.id, req.call, caller, req.timeout_ms), req.args, req.token)
        return True

    def execute(self, call: Call, args: msgspec.Raw | abi.Args,
                token: str | Capability) -> None:
        """Check and run one syscall of a known name for an authenticated caller, in its
        savepoint; its reply joins the batch's outbox. Every door comes through here: the
        byte doors above with the arguments as raw msgpack and the token as sent, and the
        HTTP door (`kernel/doors/http/bridge.py`) with the argument struct it built and validated
        (`msgspec.convert`) and the capability it verified, so nothing is encoded to be
        decoded again in the same process and the token is verified once."""
        entry = SYSCALLS[call.name]
        caller = call.caller
        if not self.calls.admit(call):
            return
        self.db.begin_call()
        failed = True
        try:
            if type(args) is msgspec.Raw:
                args = abi.decode_args(args, entry.args)
            elif type(args) is not entry.args:
                raise abi.AbiError(f"bad arguments: {call.name} takes {entry.args.__name__}, "
                                   f"not {type(args).__name__}")
            resource = entry.resource(self, args, caller) if entry.resource else None
            call.capability = self.guard.check(token, call.name, resource, caller)
            if call.capability.approval_rules:  # `requires_approval`, for any op: one gate
                result = self.approvals.guarded(call, resource,
                                                lambda: entry.handler(self, call, args))
            else:
                result = entry.handler(self, call, args)
            if result is not PENDING:
                self.calls.reply(call, result)
            failed = False
        except abi.AbiError as exc:
            self.calls.fail(call, abi.ErrorCode.EINVAL, str(exc))
            failed = False
        except Fault as exc:
            self.calls.fail(call, exc.code, exc.message)  # typed refusals keep their writes (audit)
            failed = False
        except Exception as exc:
            fault = storage_fault(exc)
            if fault is None:
                log.exception("syscall failed",
                              extra={"call": call.name, "caller": caller.principal})
                fault = StorageFault("EIO", "internal kernel error (logged)")
            else:
                log.warning("storage fault", extra={"call": call.name, "error": str(exc)})
            self.calls.fail(call, abi.ErrorCode[fault.code], fault.message)
        finally:
            self.db.end_call(ok=not failed)  # a kernel bug halfway leaves no writes behind

    def _caller(self, user: str) -> Caller | None:
        caller = self._callers.get(user)
        if caller is None:
            kind, _, ident = user.partition(":")
            caller = Caller(user, int(ident) if kind == "agent" else None)
            if len(self._callers) >= 4096:
                self._callers.clear()
            self._callers[user] = caller
        if caller.agent_id is not None and not self.procs.is_live(caller.agent_id):
            return None
        return caller

    def cancel_calls_of(self, agent_id: int) -> None:
        """A dead agent's parked calls: cancelled (in slices), and its waits released."""
        self.ipc.forget_waiters(agent_id)
        self.calls.cancel_of(f"agent:{agent_id}", f"agent {agent_id} has ended")

    def _batch_lost(self, fault: StorageFault) -> None:
        """A storage fault took the batch's writes: its calls get the fault, not success, and
        what the managers counted from those writes is read again from the database."""
        log.warning("batch lost to a storage fault", extra={"error": fault.message})
        code = int(abi.ErrorCode[fault.code])
        for frames in self.calls.outbox:
            local = type(frames[0]) is LocalRoute  # the HTTP door's replies stay structs
            try:
                msg = frames[1] if local else abi.decode_response(frames[1])
            except abi.AbiError:
                continue
            if isinstance(msg, abi.Reply):
                error = abi.Error(msg.id, code, fault.message)
                frames[1] = error if local else abi.encode(error)
                self.calls.errors[fault.code] += 1
        self.audit.reload()
        self.ipc.forget_depths()
        self.storage.forget_usage()
        self.memory.forget_usage()

    def flush(self) -> None:
        """Commit the batch's writes, then send its replies: nothing is acknowledged before it
        is durable."""
        try:
            self.db.commit()
        except StorageFault as exc:
            self._batch_lost(exc)
        self.audit.anchor()
        outbox = self.calls.take_outbox()
        door_of = self._door_of
        for route, reply in outbox:
            door = door_of.get(type(route))
            if door is not None:  # None: a door closed at shutdown (HTTP) had this call
                door.deliver(route, reply)
        for door in self._flushed:
            door.flush()

