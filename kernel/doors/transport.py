"""The kernel's front door: a ZeroMQ ROUTER on ipc:// whose peers the OS identifies.

A ZAP handler runs before any peer's first message. On ipc:// libzmq hands it the peer's
SO_PEERCRED triple `uid:gid:pid`, which the connecting process cannot forge. The handler maps it
to a principal, which libzmq then stamps on every frame of that connection as `User-Id`:

- `agent:<id>` when the uid is a sandboxed agent's own (kernel/proc/spawner.py gives every
  agent of the standard and strict tiers a uid of its own): every process of that uid, however
  it was forked, is that agent, and nothing else can be.
- a uid in the agent range that belongs to no running agent is refused.
- `agent:<id>` for an unsandboxed agent (tier none, the kernel's own uid) when the pid, or its
  nearest ancestor that the kernel spawned, is that agent's: the kernel is every agent's
  parent, so a dead agent's pid cannot be reused by anyone before the kernel has reaped it and
  dropped it from the table. A double-forked orphan of such an agent is nobody's descendant.
- `user:<uid>` for any other process whose uid is the kernel's own, root, or configured.
- anything else is refused at the handshake.

Routing ids are chosen by the client and never used as identity.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import zmq
from zmq.utils import z85

from sdk import abi

log = logging.getLogger("kernel.doors.transport")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"agentos"


def parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: parse after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


class Identities:
    """The pid → agent map the ZAP handler consults; shared with the dispatch thread."""

    def __init__(self, allowed_uids: set[int], agent_uids: range = range(0),
                 on_refused: Callable[[int, int], None] | None = None) -> None:
        self.lock = threading.Lock()  # held across spawn + register, so no agent races its entry
        self._agents: dict[int, int] = {}
        self._by_uid: dict[int, int] = {}
        self.allowed_uids = allowed_uids
        self.agent_uids = agent_uids
        self.on_refused = on_refused  # called on the ZAP thread: it must only hand work over

    def register_uid(self, uid: int, agent_id: int) -> None:
        self._by_uid[uid] = agent_id

    def unregister_uid(self, uid: int) -> None:
        self._by_uid.pop(uid, None)

    def register(self, pid: int, agent_id: int) -> None:
        self._agents[pid] = agent_id

    def unregister(self, pid: int) -> None:
        self._agents.pop(pid, None)

    def principal(self, uid: int, pid: int) -> str | None:
        found = self._principal(uid, pid)
        if found is None and self.on_refused is not None:
            self.on_refused(uid, pid)
        return found

    def _principal(self, uid: int, pid: int) -> str | None:
        with self.lock:
            agent = self._by_uid.get(uid)
            if agent is not None:
                return f"agent:{agent}"
            if uid in self.agent_uids:
                return None  # an agent's uid after the agent ended: its leftovers are nobody
            p: int | None = pid
            for _ in range(64):
                if p is None or p <= 1:
                    break
                agent = self._agents.get(p)
                if agent is not None:
                    return f"agent:{agent}"
                p = parent_pid(p)
        return f"user:{uid}" if uid in self.allowed_uids else None


class ZapHandler(threading.Thread):
    """Answers libzmq's ZAP requests for the kernel's context (RFC 27)."""

    def __init__(self, ctx: zmq.Context, resolve: Callable[[int, int], str | None]) -> None:
        super().__init__(name="zap", daemon=True)
        self.resolve = resolve
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)  # before the ROUTER binds: libzmq fails open without us

    def run(self) -> None:
        try:
            while True:
                self.sock.send_multipart(self.answer(self.sock.recv_multipart()))
        except zmq.ContextTerminated:
            pass
        finally:
            self.sock.close(linger=0)  # the context's term() waits for every socket

    def answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _routing, mechanism = frames[:6]
        refused = [version, request_id, b"400", b"refused", b"", b""]
        if domain != ZAP_DOMAIN or mechanism != b"NULL":
            return refused
        # ipc:// peers arrive as "localhost:<uid>:<gid>:<pid>" (SO_PEERCRED).
        parts = address.decode(errors="replace").split(":")
        if len(parts) != 4 or not (parts[1].isdigit() and parts[3].isdigit()):
            log.warning("refused peer without credentials", extra={"address": address.decode(
                errors="replace")})
            return refused
        uid, pid = int(parts[1]), int(parts[3])
        principal = self.resolve(uid, pid)
        if principal is None:
            log.warning("refused peer", extra={"uid": uid, "pid": pid})
            return refused
        return [version, request_id, b"200", b"OK", principal.encode(), b""]


def _limit(sock: zmq.Socket) -> None:
    """The ABI's ceiling on a request, which the SDK enforces on its side (EINVAL, never sent),
    plus room for CURVE's box around a frame: libzmq drops a peer that sends a larger frame
    before it is read, so nothing unbounded is ever allocated; requests up to it get typed
    answers (`Kernel.submit` applies the kernel's own, maybe lower, `max_message_bytes`)."""
    sock.maxmsgsize = abi.MAX_MESSAGE_BYTES + 4096


def open_router(ctx: zmq.Context, socket_path: str) -> zmq.Socket:
    """Bind the kernel's ROUTER; the ZAP handler must already be listening."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a stale socket from a crashed kernel; we hold the state lock
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.zap_domain = ZAP_DOMAIN
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    _limit(sock)
    # Per-peer queues: a peer that never reads its replies loses them, it cannot stall us.
    sock.sndhwm = 10000
    sock.rcvhwm = 10000
    sock.bind(f"ipc://{socket_path}")
    os.chmod(socket_path, 0o600)
    return sock


# --- tcp:// with CURVE, for agents on other machines --------------------------------------
#
# A second ROUTER in a context of its own (each context has one ZAP endpoint, so the ipc
# handler above stays as it is). CURVE authenticates both ends and encrypts; the ZAP handler
# gets the client's long-term public key, which cannot be claimed without its secret key, and
# maps it to a registered principal, as the ipc handler maps SO_PEERCRED.

CURVE_DOMAIN = b"agentos-remote"


class CurveZapHandler(ZapHandler):
    """Answers ZAP for the tcp:// ROUTER: CURVE clients whose key is registered, nobody else."""

    def __init__(self, ctx: zmq.Context, resolve_key: Callable[[str], str | None]) -> None:
        super().__init__(ctx, lambda uid, pid: None)
        self.name = "zap-curve"
        self.resolve_key = resolve_key

    def answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 7:
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _routing, mechanism, key = frames[:7]
        refused = [version, request_id, b"400", b"refused", b"", b""]
        if domain != CURVE_DOMAIN or mechanism != b"CURVE" or len(key) != 32:
            return refused
        client = z85.encode(key).decode()
        principal = self.resolve_key(client)
        if principal is None:
            log.warning("refused remote peer", extra={"address": address.decode(
                errors="replace"), "key": client})
            return refused
        return [version, request_id, b"200", b"OK", principal.encode(), b""]


def open_curve_router(ctx: zmq.Context, endpoint: str, secret_key: bytes) -> zmq.Socket:
    """Bind the remote ROUTER as a CURVE server; its ZAP handler must already be listening."""
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.curve_server = True
    sock.curve_secretkey = secret_key
    sock.zap_domain = CURVE_DOMAIN
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    _limit(sock)
    sock.sndhwm = 10000
    sock.rcvhwm = 10000
    sock.bind(endpoint)
    return sock
