"""Agent-to-agent mailboxes: durable, bounded, capability-gated (`ipc.send@ipc/<name>`).

A message is committed to SQLite before the sender's call returns. `recv` takes the oldest
message and deletes it in the same transaction as its reply: delivery is at most once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.call import Call, Caller, Calls, Fault
from sdk import abi

if TYPE_CHECKING:
    from kernel.config import Config
    from kernel.db import Database
    from kernel.proc.table import ProcessTable


class Mailboxes:
    def __init__(self, *, calls: Calls, config: Config, db: Database, procs: ProcessTable) -> None:
        self.calls = calls
        self.config = config
        self.db = db
        self.procs = procs
        # Parked recvs per agent, oldest first; keyed by call so a cancelled one leaves in O(1).
        self._waiters: dict[int, OrderedDict[Call, None]] = {}
        self._depth: dict[int, int] = {}

    def depth(self, agent_id: int) -> int:
        if agent_id not in self._depth:
            rows = self.db.read("SELECT COUNT(*) FROM messages WHERE receiver=?", (agent_id,))
            self._depth[agent_id] = rows[0][0]
        return self._depth[agent_id]

    def forget_depths(self) -> None:
        """Count the mailboxes again from the database (a batch was rolled back)."""
        self._depth.clear()

    def send(self, caller: Caller, args: abi.SendArgs) -> None:
        receiver = self.procs.live_by_name(args.to)
        if receiver is None or receiver.exiting:
            raise Fault(abi.ErrorCode.ENOENT, f"no running agent named {args.to!r}")
        blob = msgspec.msgpack.encode(args.data)
        limit = self.config.ipc_message_bytes
        if len(blob) > limit:
            raise Fault(abi.ErrorCode.EINVAL, f"message is {len(blob)} bytes, over {limit}")
        rid = receiver.agent_id
        if self.depth(rid) >= self.config.mailbox_depth:
            raise Fault(abi.ErrorCode.EAGAIN, f"mailbox of {args.to!r} is full")
        self.db.write("INSERT INTO messages (receiver, sender, sender_id, data, sent_at) "
                        "VALUES (?,?,?,?,?)",
                        (rid, caller.principal, caller.agent_id, blob, time.time()))
        self._depth[rid] += 1
        self._deliver(rid)

    def recv(self, call: Call, args: abi.RecvArgs) -> Any:
        agent_id = call.caller.agent_id
        if agent_id is None:
            raise Fault(abi.ErrorCode.EINVAL, "only agents have mailboxes")
        message = self._take(agent_id)
        if message is not None:
            return message
        if args.timeout_ms == 0:
            raise Fault(abi.ErrorCode.EAGAIN, "mailbox is empty")
        waiters = self._waiters.get(agent_id)
        if waiters is None:
            waiters = self._waiters[agent_id] = OrderedDict()
        waiters[call] = None
        call.on_cancel.append(lambda: waiters.pop(call, None))
        return self.calls.park(call, args.timeout_ms)

    def _take(self, agent_id: int) -> abi.Message | None:
        if self.depth(agent_id) == 0:
            return None
        seq, sender, sender_id, blob, sent_at = self.db.read(
            "SELECT seq, sender, sender_id, data, sent_at FROM messages WHERE receiver=? "
            "ORDER BY seq LIMIT 1", (agent_id,))[0]
        self.db.write("DELETE FROM messages WHERE seq=?", (seq,))
        self._depth[agent_id] -= 1
        return abi.Message(sender=sender, sender_id=sender_id,
                           data=msgspec.msgpack.decode(blob), sent_at=sent_at)

    def _deliver(self, agent_id: int) -> None:
        waiters = self._waiters.get(agent_id)
        while waiters:
            call = next(iter(waiters))
            if not call.done:
                message = self._take(agent_id)
                if message is None:
                    return
                self.calls.reply(call, message)
            waiters.pop(call, None)

    def forget_waiters(self, agent_id: int) -> None:
        """The agent's process ended: its parked recvs, cancelled soon after (see
        `Kernel.cancel_calls_of`), must take no message meant for its restart."""
        self._waiters.pop(agent_id, None)

    def drop(self, agent_id: int) -> None:
        """An ended agent's mailbox and waiters go with it."""
        self.db.write("DELETE FROM messages WHERE receiver=?", (agent_id,))
        self._depth.pop(agent_id, None)
        self._waiters.pop(agent_id, None)
