"""The syscall transport: a ZeroMQ DEALER to the kernel, in blocking and asyncio forms.

Each call sends one `Request` and waits for the reply with the same id. A socket monitor watches
the connection, so a kernel that dies mid-call fails the call at once (`KernelUnavailable`)
instead of leaving it hanging; a call that names no server-side wait also has a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sdk import abi
from sdk.errors import InvalidArgument, KernelUnavailable, SyscallError, from_code

# How long a call waits for its reply beyond any wait the kernel performs on its behalf.
DEFAULT_TIMEOUT = 30.0

_LOST = zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED


def _check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.exists(path):
            raise KernelUnavailable(f"no kernel listening at {path}")


def _make_request(ids: itertools.count, name: str, token: str, args: abi.Args | None,
                  server_wait_ms: int | None) -> abi.Request:
    raw = msgspec.Raw(abi.encode(args if args is not None else abi.NoArgs()))
    return abi.Request(v=abi.ABI_VERSION, id=next(ids), call=name, token=token, args=raw,
                       timeout_ms=server_wait_ms)


def _deadline(timeout: float | None, server_wait_ms: int | None,
              wait_forever: bool) -> float | None:
    if wait_forever:
        return None
    budget = timeout if timeout is not None else DEFAULT_TIMEOUT
    if server_wait_ms is not None:
        budget += server_wait_ms / 1000
    return time.monotonic() + budget


def _result(resp: abi.Reply | abi.Error, result_type: Any) -> Any:
    if isinstance(resp, abi.Error):
        raise from_code(resp.code, resp.message)
    try:
        return abi.decode_result(resp.result, result_type)
    except abi.AbiError as exc:
        raise InvalidArgument(str(exc)) from None


class _Transport:
    """What families need from a connection: `call(name, args, result_type, ...)`."""

    call: Callable[..., Any]


class Connection(_Transport):
    """A blocking connection to the kernel; safe to share between threads (calls serialise)."""

    def __init__(self, endpoint: str, token: str, *, timeout: float = DEFAULT_TIMEOUT,
                 context: zmq.Context | None = None) -> None:
        from sdk.families import Ipc, Proc, System

        _check_endpoint(endpoint)
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._monitor = self._sock.get_monitor_socket(_LOST)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._lost = False
        self.sys, self.proc, self.ipc = System(self), Proc(self), Ipc(self)

    def call(self, name: str, args: abi.Args | None = None, result_type: Any = Any, *,
             server_wait_ms: int | None = None, wait_forever: bool = False,
             timeout: float | None = None) -> Any:
        req = _make_request(self._ids, name, self.token, args, server_wait_ms)
        deadline = _deadline(timeout if timeout is not None else self.timeout, server_wait_ms,
                             wait_forever)
        with self._lock:
            if self._lost:
                raise KernelUnavailable("connection to the kernel was lost")
            self._sock.send(abi.encode(req))
            return _result(self._await_reply(req.id, name, deadline), result_type)

    def _await_reply(self, rid: int, name: str, deadline: float | None) -> abi.Reply | abi.Error:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            wait_ms = None if left is None else max(0, int(left * 1000))
            ready = dict(poller.poll(wait_ms))
            if not ready:
                raise KernelUnavailable(f"{name}: no reply from the kernel in time")
            if self._monitor in ready:
                event = parse_monitor_message(self._monitor.recv_multipart())
                if event["event"] & _LOST:
                    self._lost = True
                    raise KernelUnavailable(f"{name}: connection to the kernel was lost")
            if self._sock in ready:
                try:
                    resp = abi.decode_response(self._sock.recv())
                except abi.AbiError:
                    continue  # a garbled frame cannot be ours to answer; keep waiting
                if resp.id == rid:
                    return resp
                # A reply to an earlier call that timed out on our side: drop it.

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncConnection(_Transport):
    """An asyncio connection: calls are coroutines and may run concurrently on one socket."""

    def __init__(self, endpoint: str, token: str, *, timeout: float = DEFAULT_TIMEOUT,
                 context: zmq.asyncio.Context | None = None) -> None:
        from sdk.families import Ipc, Proc, System

        _check_endpoint(endpoint)
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._monitor = self._sock.get_monitor_socket(_LOST)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[abi.Reply | abi.Error]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lost: SyscallError | None = None
        self.sys, self.proc, self.ipc = System(self), Proc(self), Ipc(self)

    async def call(self, name: str, args: abi.Args | None = None, result_type: Any = Any, *,
                   server_wait_ms: int | None = None, wait_forever: bool = False,
                   timeout: float | None = None) -> Any:
        if self._lost is not None:
            raise self._lost
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        req = _make_request(self._ids, name, self.token, args, server_wait_ms)
        deadline = _deadline(timeout if timeout is not None else self.timeout, server_wait_ms,
                             wait_forever)
        fut: asyncio.Future[abi.Reply | abi.Error] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = fut
        try:
            await self._sock.send(abi.encode(req))
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                resp = await asyncio.wait_for(fut, wait_s)
            except TimeoutError:
                raise KernelUnavailable(f"{name}: no reply from the kernel in time") from None
        finally:
            self._pending.pop(req.id, None)
        return _result(resp, result_type)

    async def _read(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            if self._monitor in ready:
                event = parse_monitor_message(await self._monitor.recv_multipart())
                if event["event"] & _LOST:
                    self._lost = KernelUnavailable("connection to the kernel was lost")
                    for fut in self._pending.values():
                        if not fut.done():
                            fut.set_exception(self._lost)
                    return
            if self._sock in ready:
                try:
                    resp = abi.decode_response(await self._sock.recv())
                except abi.AbiError:
                    continue
                fut = self._pending.get(resp.id)
                if fut is not None and not fut.done():
                    fut.set_result(resp)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
