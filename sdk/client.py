"""The syscall transport: a ZeroMQ DEALER to the kernel, in blocking and asyncio forms.

An agent the kernel gave shared-memory rings (`sdk.ringpath`) sends each request that fits a
slot through its submission ring and gets the replies and stream chunks of those requests
through its completion ring; larger requests, and processes without rings, use the DEALER.
Callers never see which path a call took.

Each call sends one `Request` and receives zero or more `Chunk`s and then one `Reply` or
`Error` with the same id. A socket monitor watches the connection, so a kernel that dies
mid-call fails the call at once (`KernelUnavailable`) instead of leaving it hanging; a call
that names no server-side wait also has a deadline. Leaving a stream early cancels it in the
kernel (`llm.cancel`), so an abandoned generation stops using the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sdk import abi, ringpath
from sdk.errors import InvalidArgument, KernelUnavailable, SyscallError, from_code
from sdk.remote import CurveKeys
from sdk.syscalls import SIGNATURES

if TYPE_CHECKING:
    from sdk.batch import Batch

# How long a call waits for its reply beyond any wait the kernel performs on its behalf.
DEFAULT_TIMEOUT = 30.0
# A blocked reader sleeps in its poll until a message, its deadline, a thread that wants the
# socket (which nudges it through `_wake`) or this long, whichever is first. (It used to wake
# every 50 ms so that threads sharing a connection took turns: at 1,400 idle agents those
# wakeups alone kept both cores of this VM busy.)
_READ_SLICE_MS = 1000

_LOST = zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED


def _check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.exists(path):
            raise KernelUnavailable(f"no kernel listening at {path}: start one with "
                                    "`agentos boot --daemon`", code=abi.ErrorCode.ENOENT)


_NO_ARGS = msgspec.Raw(abi.encode(abi.NoArgs()))


def _make_request(ids: itertools.count, name: str, token: str, args: abi.Args | None,
                  server_wait_ms: int | None) -> abi.Request:
    raw = _NO_ARGS if args is None else msgspec.Raw(abi.encode(args))
    return abi.Request(v=abi.ABI_VERSION, id=next(ids), call=name, token=token, args=raw,
                       timeout_ms=server_wait_ms)


def _budget(timeout: float, server_wait_ms: int | None, wait_forever: bool) -> float | None:
    """Seconds to wait for the next message of a call, or None for as long as the kernel
    lives."""
    if wait_forever:
        return None
    return timeout + (server_wait_ms / 1000 if server_wait_ms is not None else 0.0)


def _decode(raw: msgspec.Raw, kind: Any) -> Any:
    try:
        return abi.decode_result(raw, kind)
    except abi.AbiError as exc:
        raise InvalidArgument(str(exc)) from None


def _by_ring(channel: ringpath.RingChannel | None, name: str, args: abi.Args | None,
             data: bytes, ring_rids: set[int]) -> bool:
    """Whether a request takes the ring: it fits a slot, and a cancel follows the call it
    cancels (the kernel finds that call by the door it came through)."""
    if channel is None or len(data) > channel.limit:
        return False
    if name == "llm.cancel" and isinstance(args, abi.CancelArgs):
        return args.request in ring_rids
    return True


def _oversize(name: str, rid: int, data: bytes) -> abi.Error | None:
    """The answer for a request larger than the ABI allows, which is never sent: the kernel's
    transport would drop the whole connection instead of answering it."""
    if len(data) <= abi.MAX_MESSAGE_BYTES:
        return None
    return abi.Error(rid, int(abi.ErrorCode.EINVAL), f"{name}: request of {len(data)} bytes is "
                     f"over the ABI's limit of {abi.MAX_MESSAGE_BYTES}; not sent")


def _final(resp: abi.Reply | abi.Error, result_type: Any) -> Any:
    if isinstance(resp, abi.Error):
        raise from_code(resp.code, resp.message)
    return _decode(resp.result, result_type)


class Connection:
    """A blocking connection to the kernel. Threads may share it; each call waits for its own
    messages (others' are kept for them)."""

    def __init__(self, endpoint: str, token: str, *, timeout: float = DEFAULT_TIMEOUT,
                 context: zmq.Context | None = None, curve: CurveKeys | None = None,
                 rings: bool = False) -> None:
        from sdk.families import attach

        _check_endpoint(endpoint)
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._monitor = self._sock.get_monitor_socket(_LOST)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the socket's: one thread sends or reads at a time
        # A thread waiting for the lock while another reads: counted, and a sender nudges the
        # reader out of its poll through the eventfd.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller.register(self._wake, zmq.POLLIN)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._inbox: dict[int, collections.deque[abi.Reply | abi.Error | abi.Chunk]] = {}
        self._lost = False
        self._ring = ringpath.claim(endpoint)
        self._ring_rids: set[int] = set()  # calls in flight through the ring
        if self._ring is not None:
            self._ids = self._ring.ids
            self._poller.register(self._ring.doorbell, zmq.POLLIN)
        attach(self)
        if rings and self._ring is None and endpoint.startswith("ipc://"):
            self._ask_for_rings()

    def _ask_for_rings(self) -> None:
        """Rings for a process that connected on its own (`sys.rings`, kernel/doors/ringdoor.py);
        ZeroMQ stays the path when the kernel or this machine cannot give them."""
        try:
            ticket = self.call("sys.rings", None, SIGNATURES["sys.rings"].result)
            channel = ringpath.attach_ticket(ticket.path, ticket.ticket, self._ids,
                                             timeout=self.timeout)
        except (SyscallError, ringpath.RingError, OSError, ValueError):
            return
        self._ring = channel
        self._poller.register(channel.doorbell, zmq.POLLIN)

    @property
    def uses_rings(self) -> bool:
        return self._ring is not None

    def _send(self, name: str, args: abi.Args | None, server_wait_ms: int | None) -> int:
        return self._send_many([(name, args, server_wait_ms)])[0]

    def _send_many(self, calls: list[tuple[str, abi.Args | None, int | None]]) -> list[int]:
        """Send requests together: each that fits a slot goes into the submission ring and the
        kernel is rung once for all of them (io_uring_enter's batching); the rest, and all of
        them without rings, over ZeroMQ."""
        reqs = [_make_request(self._ids, name, self.token, args, wait)
                for name, args, wait in calls]
        with self._holding(nudge=True):
            if self._lost:
                raise KernelUnavailable("connection to the kernel was lost")
            pushed = False
            for (name, args, _), req in zip(calls, reqs, strict=True):
                self._inbox[req.id] = collections.deque()
                pushed |= self._post(name, args, req.id, abi.encode(req))
            if pushed:
                assert self._ring is not None
                self._ring.ring()
        return [req.id for req in reqs]

    def _post(self, name: str, args: abi.Args | None, rid: int, data: bytes) -> bool:
        """Route one encoded request (the lock held): into the submission ring if it takes it,
        else over ZeroMQ. True if it went into the ring (ring the doorbell after)."""
        refused = _oversize(name, rid, data)
        if refused is not None:
            self._inbox[rid].append(refused)
            return False
        ring = self._ring
        if ring is not None and _by_ring(ring, name, args, data, self._ring_rids):
            # A full ring sends the rest over ZeroMQ, except a cancel, which must take the ring:
            # the kernel drains it whatever we do (rung, so room comes soon).
            deadline = time.monotonic() + self.timeout
            while not ring.push(data):
                if name != "llm.cancel" or time.monotonic() >= deadline:
                    break
                ring.ring()
                time.sleep(0.0002)
            else:
                self._ring_rids.add(rid)
                return True
        self._sock.send(data)
        return False

    def batch(self) -> Batch:
        """Syscalls issued together and answered together: `with conn.batch() as b:` then
        `x = b.memory.get(...)`, ..., and after the block `x.result()`. One doorbell for the
        whole batch; results are independent (one call's error is raised by its own
        `result()`), and the kernel may run them in any order."""
        from sdk.batch import Batch

        return Batch(self)

    @contextlib.contextmanager
    def _holding(self, nudge: bool = False, timeout: float = -1) -> Iterator[bool]:
        """The socket's lock (yields False if `timeout` passed without it). A sender nudges a
        reader that holds it out of its poll; a reader waits its turn (the reader files every
        thread's messages, and lets waiters in after each poll)."""
        got = self._lock.acquire(blocking=False)
        if not got:
            with self._waiting_lock:
                self._waiting += 1
            try:
                if nudge:
                    os.eventfd_write(self._wake, 1)
                got = self._lock.acquire(timeout=timeout)
            finally:
                with self._waiting_lock:
                    self._waiting -= 1
        try:
            yield got
        finally:
            if got:
                self._lock.release()

    def _let_waiters_in(self) -> None:
        """Released after a poll: give threads waiting for the lock a moment to take it
        (a lock is not fair, and this reader is about to take it again)."""
        until = time.monotonic() + 0.05
        while self._waiting and time.monotonic() < until:
            time.sleep(0.0002)

    def _next(self, rid: int, name: str, budget: float | None) -> abi.Reply | abi.Error | abi.Chunk:
        """The next message for call `rid`, waiting at most `budget` seconds (None: forever)."""
        deadline = None if budget is None else time.monotonic() + budget
        box = self._inbox[rid]
        while True:
            if box:
                return box.popleft()
            wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
            with self._holding(timeout=wait) as got:
                if box:
                    continue
                if not got:  # another thread read all along and filed nothing for us
                    if deadline is not None and time.monotonic() >= deadline:
                        raise KernelUnavailable(f"{name}: no reply from the kernel in time")
                    continue
                if self._lost:
                    raise KernelUnavailable(f"{name}: connection to the kernel was lost")
                left_ms = _READ_SLICE_MS if deadline is None else min(
                    _READ_SLICE_MS, max(0, int((deadline - time.monotonic()) * 1000)))
                if self._ring is not None:
                    if rid in self._ring_rids and self._ring.spin():
                        self._read_ring()
                        continue
                    self._read_ring()
                    if box:
                        continue
                ready = dict(self._poller.poll(left_ms))
                if self._wake in ready:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                if self._ring is not None and self._ring.doorbell in ready:
                    self._ring.clear()
                    self._read_ring()
                if self._monitor in ready:
                    event = parse_monitor_message(self._monitor.recv_multipart())
                    if event["event"] & _LOST:
                        self._lost = True
                        raise KernelUnavailable(f"{name}: connection to the kernel was lost")
                if self._sock in ready:
                    self._read_available()
            if not box:
                if deadline is not None and time.monotonic() >= deadline:
                    raise KernelUnavailable(f"{name}: no reply from the kernel in time")
                self._let_waiters_in()

    def _read_ring(self) -> None:
        assert self._ring is not None
        for data in self._ring.completions():
            self._file(data)

    def _file(self, data: bytes) -> None:
        try:
            msg = abi.decode_response(data)
        except abi.AbiError:
            return  # a garbled frame cannot be ours to answer
        box = self._inbox.get(msg.id)
        if box is not None:
            box.append(msg)
        # Otherwise: a reply to a call that already gave up waiting. Drop it.

    def _read_available(self) -> None:
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._file(data)

    def _done(self, rid: int) -> None:
        self._inbox.pop(rid, None)
        self._ring_rids.discard(rid)

    def call(self, name: str, args: abi.Args | None = None, result_type: Any = Any, *,
             server_wait_ms: int | None = None, wait_forever: bool = False,
             timeout: float | None = None) -> Any:
        rid = self._send(name, args, server_wait_ms)
        budget = _budget(self.timeout if timeout is None else timeout, server_wait_ms,
                         wait_forever)
        try:
            while True:
                msg = self._next(rid, name, budget)
                if not isinstance(msg, abi.Chunk):
                    return _final(msg, result_type)
        finally:
            self._done(rid)

    def stream(self, name: str, args: abi.Args | None, chunk_type: Any, result_type: Any, *,
               server_wait_ms: int | None = None, wait_forever: bool = True,
               timeout: float | None = None) -> Stream:
        rid = self._send(name, args, server_wait_ms)
        budget = _budget(self.timeout if timeout is None else timeout, server_wait_ms,
                         wait_forever)
        return Stream(self, rid, name, chunk_type, result_type, budget)

    def close(self) -> None:
        if self._ring is not None:
            ringpath.release(self._ring)
            self._ring = None
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream:
    """Iterate a streamed call's chunks; `result` holds its final value once iteration ends.
    Closing it early (or leaving a `with` block) cancels the call in the kernel."""

    def __init__(self, conn: Connection, rid: int, name: str, chunk_type: Any, result_type: Any,
                 budget: float | None) -> None:
        self._conn, self.request_id, self._name = conn, rid, name
        self._chunk_type, self._result_type, self._budget = chunk_type, result_type, budget
        self.result: Any = None
        self.finished = False

    def __iter__(self) -> Iterator[Any]:
        try:
            while not self.finished:
                msg = self._conn._next(self.request_id, self._name, self._budget)
                if isinstance(msg, abi.Chunk):
                    yield _decode(msg.data, self._chunk_type)
                else:
                    self.finished = True
                    self.result = _final(msg, self._result_type)
        finally:
            self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            try:
                self._conn.llm.cancel(self.request_id)
            except SyscallError:
                pass  # it finished meanwhile, or the kernel is gone: nothing left to cancel
        self._conn._done(self.request_id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Inbox:
    """One asyncio call's messages: a deque and at most one waiter (an asyncio.Queue and
    wait_for cost more than the rest of a ring call together)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[abi.Reply | abi.Error | abi.Chunk | None] = \
            collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, msg: abi.Reply | abi.Error | abi.Chunk | None) -> None:
        self.items.append(msg)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self, budget: float | None) -> abi.Reply | abi.Error | abi.Chunk | None:
        """The next message; TimeoutError after `budget` seconds (None: no limit)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                if budget is None:
                    await self.waiter
                else:
                    async with asyncio.timeout(budget):
                        await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class AsyncConnection:
    """An asyncio connection: calls are coroutines and may run concurrently on one socket."""

    def __init__(self, endpoint: str, token: str, *, timeout: float = DEFAULT_TIMEOUT,
                 context: zmq.asyncio.Context | None = None,
                 curve: CurveKeys | None = None) -> None:
        from sdk.families import attach

        _check_endpoint(endpoint)
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._monitor = self._sock.get_monitor_socket(_LOST)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Inbox] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lost: SyscallError | None = None
        self._ring = ringpath.claim(endpoint)
        self._ring_rids: set[int] = set()
        self._ring_loop: asyncio.AbstractEventLoop | None = None
        self._doorbell_due = False
        if self._ring is not None:
            self._ids = self._ring.ids
        attach(self)

    @property
    def uses_rings(self) -> bool:
        return self._ring is not None

    async def _send(self, name: str, args: abi.Args | None, server_wait_ms: int | None) -> int:
        if self._lost is not None:
            raise self._lost
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        req = _make_request(self._ids, name, self.token, args, server_wait_ms)
        data = abi.encode(req)
        self._pending[req.id] = _Inbox()
        refused = _oversize(name, req.id, data)
        if refused is not None:
            self._pending[req.id].put(refused)
            return req.id
        ring = self._ring
        if ring is not None and _by_ring(ring, name, args, data, self._ring_rids):
            if self._ring_loop is None:
                self._ring_loop = asyncio.get_running_loop()
                self._ring_loop.add_reader(ring.doorbell, self._read_ring)
            pushed = ring.push(data)
            while not pushed and name == "llm.cancel":
                ring.ring()
                await asyncio.sleep(0.0002)
                pushed = ring.push(data)
            if pushed:
                self._ring_rids.add(req.id)
                if not self._doorbell_due:
                    # Calls made in the same turn of the event loop share one doorbell.
                    self._doorbell_due = True
                    self._ring_loop.call_soon(self._ring_doorbell)
                return req.id
        await self._sock.send(data)
        return req.id

    def _ring_doorbell(self) -> None:
        self._doorbell_due = False
        if self._ring is not None:
            self._ring.ring()

    def _read_ring(self) -> None:
        if self._ring is None:
            return
        self._ring.clear()
        for data in self._ring.completions():
            try:
                msg = abi.decode_response(data)
            except abi.AbiError:
                continue
            queue = self._pending.get(msg.id)
            if queue is not None:
                queue.put(msg)

    async def _next(self, rid: int, name: str,
                    budget: float | None) -> abi.Reply | abi.Error | abi.Chunk:
        try:
            msg = await self._pending[rid].get(budget)
        except TimeoutError:
            raise KernelUnavailable(f"{name}: no reply from the kernel in time") from None
        if msg is None:
            assert self._lost is not None
            raise self._lost
        return msg

    async def call(self, name: str, args: abi.Args | None = None, result_type: Any = Any, *,
                   server_wait_ms: int | None = None, wait_forever: bool = False,
                   timeout: float | None = None) -> Any:
        rid = await self._send(name, args, server_wait_ms)
        budget = _budget(self.timeout if timeout is None else timeout, server_wait_ms,
                         wait_forever)
        try:
            while True:
                msg = await self._next(rid, name, budget)
                if not isinstance(msg, abi.Chunk):
                    return _final(msg, result_type)
        finally:
            self._pending.pop(rid, None)
            self._ring_rids.discard(rid)

    async def stream(self, name: str, args: abi.Args | None, chunk_type: Any, result_type: Any, *,
                     server_wait_ms: int | None = None, wait_forever: bool = True,
                     timeout: float | None = None) -> AsyncStream:
        rid = await self._send(name, args, server_wait_ms)
        budget = _budget(self.timeout if timeout is None else timeout, server_wait_ms,
                         wait_forever)
        return AsyncStream(self, rid, name, chunk_type, result_type, budget)

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
                    for queue in self._pending.values():
                        queue.put(None)
                    return
            if self._sock in ready:
                try:
                    msg = abi.decode_response(await self._sock.recv())
                except abi.AbiError:
                    continue
                queue = self._pending.get(msg.id)
                if queue is not None:
                    queue.put(msg)

    async def close(self) -> None:
        if self._ring is not None:
            if self._ring_loop is not None:
                self._ring_loop.remove_reader(self._ring.doorbell)
            ringpath.release(self._ring)
            self._ring = None
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


class AsyncStream:
    """`async for` over a streamed call's chunks; `result` holds the final value afterwards."""

    def __init__(self, conn: AsyncConnection, rid: int, name: str, chunk_type: Any,
                 result_type: Any, budget: float | None) -> None:
        self._conn, self.request_id, self._name = conn, rid, name
        self._chunk_type, self._result_type, self._budget = chunk_type, result_type, budget
        self.result: Any = None
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while not self.finished:
                msg = await self._conn._next(self.request_id, self._name, self._budget)
                if isinstance(msg, abi.Chunk):
                    yield _decode(msg.data, self._chunk_type)
                else:
                    self.finished = True
                    self.result = _final(msg, self._result_type)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            try:
                await self._conn.llm.cancel(self.request_id)
            except SyscallError:
                pass
        self._conn._pending.pop(self.request_id, None)
        self._conn._ring_rids.discard(self.request_id)
