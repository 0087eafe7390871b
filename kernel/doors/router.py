"""The front door: the ZeroMQ ROUTER on the state dir's ipc:// socket (and each agent's own
endpoint, bound on it at spawn), every peer's principal attested by ZAP (transport.py)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import zmq

from kernel.doors import BATCH, DOOR_BUDGET_S, Door
from kernel.doors.transport import ZapHandler, open_router
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Kernel

log = logging.getLogger("kernel.doors.router")


class RouterDoor(Door):
    routes = bytes

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, kernel.identities.principal)
        self.zap.start()
        self.path = kernel.state.socket_path
        self.socket = open_router(self.ctx, str(self.path))
        kernel.poller.register(self.socket, zmq.POLLIN)

    def on_ready(self, ready: Mapping[Any, int]) -> None:
        """Up to BATCH messages or DOOR_BUDGET_S of work; the rest wait for the next iteration
        (the ROUTER queues them fairly, per peer)."""
        if self.socket not in ready:
            return
        deadline = time.monotonic() + DOOR_BUDGET_S
        for _ in range(BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self.dispatch(frames)
            except Exception:  # the last line of defence: log, never die
                log.exception("dispatch failed")
            if time.monotonic() >= deadline:
                return

    def dispatch(self, frames: list[zmq.Frame]) -> None:
        route = frames[0].bytes
        user = frames[-1].get("User-Id") if len(frames) > 1 else None
        if not user:
            # libzmq admits peers when no ZAP handler answers; ours always does, so a frame
            # without a principal is a bug or an attack. Drop it unanswered.
            log.error("message without attested principal dropped")
            return
        if len(frames) != 2:
            self.k.calls.send_error(route, 0, abi.ErrorCode.EINVAL, "expected exactly one frame")
            return
        self.k.submit(route, user, frames[1].bytes)

    def deliver(self, route: bytes, reply: Any) -> None:
        try:
            self.socket.send_multipart([route, reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone or not reading; its reply is lost with it

    def close(self) -> None:
        self.socket.close(linger=0)
        self.ctx.term()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
