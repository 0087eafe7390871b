"""Remote agents: the kernel's tcp:// endpoint with CurveZMQ, and the registry of client keys.

Off unless the kernel is booted with `--listen tcp://HOST:PORT` (`listen` in the config). The
server's key pair lives in `STATE/remote/server.key` (0600), made on first use; clients are
registered by name and CURVE public key (`agentos agent add-key NAME KEY`), kept in
`STATE/remote/clients.json`. A client's principal is `remote:<name>`, attested by its key at
the handshake (ZAP) as a local caller's is by SO_PEERCRED; the token `add-key` mints for it is
bound to that principal, so it is worthless to anyone without the client's secret key.
Removing a key refuses new connections at once and the calls of open ones from the next call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from kernel.call import Call, Fault
from kernel.doors import BATCH, DOOR_BUDGET_S, Door
from kernel.doors.transport import CurveZapHandler, open_curve_router
from kernel.state import write_private
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Kernel

log = logging.getLogger("kernel.doors.remote")

PREFIX = "remote:"


class RemoteRoute(bytes):
    """The reply route of a call that came in over tcp://: `tcp:` + the peer's routing id."""


def server_keys(directory: Path) -> tuple[bytes, bytes]:
    """The kernel's CURVE key pair (public, secret), made and stored on first use."""
    path = directory / "server.key"
    try:
        public, secret = path.read_bytes().split()
        return public, secret
    except FileNotFoundError:
        pass
    directory.mkdir(mode=0o700, exist_ok=True)
    public, secret = zmq.curve_keypair()
    write_private(path, public + b"\n" + secret + b"\n")
    return public, secret


class KeyRegistry:
    """Registered clients: name → z85 public key. Read by the ZAP thread, written by the loop
    (a new dict each time, swapped in whole, so the reader never sees one half-changed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._keys: dict[str, str] = json.loads(path.read_text())
        except FileNotFoundError:
            self._keys = {}

    def principal_of_key(self, key: str) -> str | None:
        name = next((n for n, k in self._keys.items() if k == key), None)
        return None if name is None else PREFIX + name

    def registered(self, name: str) -> bool:
        return name in self._keys

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._keys.items())

    def set(self, name: str, key: str | None) -> None:
        with self._lock:
            keys = dict(self._keys)
            if key is None:
                keys.pop(name, None)
            else:
                keys[name] = key
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            write_private(self.path, json.dumps(keys, indent=1).encode())
            self._keys = keys


class Remote(Door):
    """The registry always; the tcp:// door when the kernel listens."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.dir = kernel.state.root / "remote"
        self.keys = KeyRegistry(self.dir / "clients.json")
        self.endpoint: str | None = None
        self.router: zmq.Socket | None = None
        self._ctx: zmq.Context | None = None

    def open(self, endpoint: str) -> None:
        if not endpoint.startswith("tcp://"):
            raise ValueError(f"listen must be a tcp:// endpoint, not {endpoint!r}")
        _public, secret = server_keys(self.dir)
        self._ctx = zmq.Context()
        zap = CurveZapHandler(self._ctx, self.keys.principal_of_key)
        zap.start()
        self.router = open_curve_router(self._ctx, endpoint, secret)
        self.endpoint = self.router.last_endpoint.decode()
        self.k.poller.register(self.router, zmq.POLLIN)
        log.info("listening for remote agents", extra={"endpoint": self.endpoint})

    def close(self) -> None:
        if self.router is not None and self._ctx is not None:
            self.router.close(linger=0)
            self._ctx.term()
            self.router = None

    # --- the door ----------------------------------------------------------------------------

    routes = RemoteRoute

    def on_ready(self, ready: Mapping[Any, int]) -> None:
        """Up to BATCH messages, for at most DOOR_BUDGET_S (the loop's budget per door)."""
        if self.router is None or self.router not in ready:
            return
        deadline = time.monotonic() + DOOR_BUDGET_S
        for _ in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._dispatch(frames)
            except Exception:
                log.exception("remote dispatch failed")
            if time.monotonic() >= deadline:
                return

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        route = RemoteRoute(b"tcp:" + frames[0].bytes)
        user = frames[-1].get("User-Id") if len(frames) > 1 else None
        if not user or not user.startswith(PREFIX):
            log.error("remote message without attested principal dropped")
            return
        if len(frames) != 2:
            self.k.calls.send_error(route, 0, abi.ErrorCode.EINVAL, "expected exactly one frame")
            return
        data = frames[1].bytes
        if not self.keys.registered(user[len(PREFIX):]):
            self.k.calls.send_error(route, abi.request_id_of(data), abi.ErrorCode.EPERM,
                               f"{user}: key no longer registered")
            return
        self.k.submit(route, user, data)

    def deliver(self, route: bytes, frame: bytes) -> None:
        """Send a reply to the remote peer of `route`."""
        if self.router is not None:
            try:
                self.router.send_multipart([route[4:], frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # gone, or not reading its replies

    # --- the registry's syscalls -------------------------------------------------------------

    def add_key(self, call: Call, args: abi.KeyArgs) -> abi.RemoteGrant:
        from sdk.tokens import Rule

        if any(k == args.key for n, k in self.keys.items() if n != args.name):
            raise Fault(abi.ErrorCode.EBUSY, "that key is registered under another name")
        rules = self.k.access.rules(args.caps)
        self.k.access.check_grant(call.capability, rules)
        principal = PREFIX + args.name
        granted = [Rule("sys.*"), *rules]
        token = self.k.access.authority.mint(principal, granted)
        self.k.access.record(token)
        self.keys.set(args.name, args.key)
        self.k.audit.append(call.caller.principal, "add-key", subject=principal, key=args.key,
                            rules=[str(r) for r in granted])
        public, _ = server_keys(self.dir)
        return abi.RemoteGrant(principal, self.endpoint, public.decode(), token)

    def list_keys(self) -> list[abi.RemoteKey]:
        return [abi.RemoteKey(name, key, PREFIX + name) for name, key in self.keys.items()]

    def rm_key(self, call: Call, args: abi.KeyRef) -> None:
        if not self.keys.registered(args.name):
            raise Fault(abi.ErrorCode.ENOENT, f"no remote key named {args.name!r}")
        self.keys.set(args.name, None)
        # Revoke what was minted for the name too, so registering it again (even with the
        # same key) does not bring an old token back to life.
        principal = PREFIX + args.name
        revoked = self.k.access.revoke_subject(principal, call.caller.principal, "rm-key")
        self.k.audit.append(call.caller.principal, "rm-key", subject=principal, revoked=revoked)
