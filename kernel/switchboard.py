"""The switchboard: every call in flight and the loop's hand-offs, the one service rooms get.

A manager (ipc, llm, memory, storage, tools, proc, access) never holds the `Kernel`: it holds
this (typed as `kernel.call.Calls`) and the few other rooms it names in its constructor. Here a
call is parked until an event answers it (or its deadline fails it), answered, failed, streamed
in chunks, handed to another thread, and a dead principal's parked calls are cancelled in
slices. Other threads reach the loop only through `post`; `after` runs a function later on it.
Replies wait in `outbox` until the loop commits the batch and delivers them (kernel/core.py).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from kernel.accounts import Accounts
from kernel.call import PENDING, Call, LocalRoute, Timer
from sdk import abi

log = logging.getLogger("kernel")

CANCEL_SLICE = 64  # a dead agent's parked calls cancelled per loop iteration


class Switchboard:
    def __init__(self, agent_cap: int, user_cap: int) -> None:
        self.agent_cap = agent_cap  # calls in flight per agent, remote agent or HTTP key
        self.user_cap = user_cap  # and per user (the admin's CLI, `agentos top`, scripts)
        self.accounts = Accounts()
        self.counts: Counter[str] = Counter()  # syscalls made, by name
        self.errors: Counter[str] = Counter()  # errors answered, by code
        self.outbox: list[list[Any]] = []  # [route, reply frame (a struct: LocalRoute)]
        self.draining = False  # the kernel is stopping: rooms refuse new long work
        self.offloaded = 0  # calls in the hands of another thread (see `offload`)
        # Calls answered later (`park`), per principal: waiting for an event, a model, a tool or
        # the memory index. Every call that is admitted and not answered at once is here, so
        # this is also what each principal has in flight, capped by `admit`. Dicts keyed by
        # call: adding, answering and cancelling one is O(1) whatever else is parked.
        self._parked: dict[str, dict[Call, None]] = {}
        self._by_request: dict[tuple[bytes, int], Call] = {}  # (route, id) -> parked call
        self._timers: list[Timer] = []
        self._timer_seq = itertools.count()
        self._dead_timers = 0  # cancelled timers still in the heap
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self.post_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the loop polls it

    def close(self) -> None:
        os.close(self.post_fd)
        self.post_fd = -1  # a straggling post() must not write into a reused fd number

    # --- work from other threads -------------------------------------------------------------

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread soon; the only way other threads touch kernel state."""
        self._posted.append(fn)
        try:
            os.eventfd_write(self.post_fd, 1)
        except (BlockingIOError, OSError):
            pass  # the counter is saturated or closed: the loop is awake or gone anyway

    def run_posted(self) -> None:
        try:
            os.eventfd_read(self.post_fd)
        except (BlockingIOError, OSError):
            pass
        while self._posted:
            fn = self._posted.popleft()
            try:
                fn()
            except Exception:
                log.exception("posted work failed")

    # --- timers ------------------------------------------------------------------------------

    def after(self, seconds: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` on the loop in `seconds` (at the earliest the next iteration)."""
        timer = Timer(time.monotonic() + seconds, next(self._timer_seq), fn)
        heapq.heappush(self._timers, timer)
        return timer

    def cancel_timer(self, timer: Timer) -> None:
        """`timer` will not run. O(1): it stays in the heap, skipped when due, and the heap is
        rebuilt once cancelled timers are half of it, so calls answered long before their
        deadlines (a hostile agent's, parked for days) cannot pile up in it."""
        if timer.fn is None:
            return
        timer.fn = None
        self._dead_timers += 1
        if self._dead_timers > 64 and 2 * self._dead_timers > len(self._timers):
            self._timers = [t for t in self._timers if t.fn is not None]
            heapq.heapify(self._timers)
            self._dead_timers = 0

    def next_timer(self) -> float | None:
        """When the next timer is due (monotonic), if any."""
        return self._timers[0].when if self._timers else None

    def timers_pending(self) -> int:
        return len(self._timers)

    def run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            fn, timer.fn = timer.fn, None  # out of the heap: cancelling it now is a no-op
            if fn is None:
                self._dead_timers -= 1
                continue
            try:
                fn()
            except Exception:
                log.exception("timer failed")

    # --- parked calls ------------------------------------------------------------------------

    def cap(self, principal: str) -> int:
        """How many calls `principal` may have in flight at once (kernel config
        agent_calls_in_flight / user_calls_in_flight)."""
        return self.user_cap if principal.startswith("user:") else self.agent_cap

    def admit(self, call: Call) -> bool:
        """False, and `call` failed with EAGAIN, when its principal already has its most in
        flight: checked before a call runs, at the one place every door goes through."""
        held = self._parked.get(call.caller.principal)
        if held is None or len(held) < self.cap(call.caller.principal):
            return True
        self.fail(call, abi.ErrorCode.EAGAIN,
                  f"{call.caller.principal} has {len(held)} calls in flight, its most (kernel "
                  "config agent_calls_in_flight / user_calls_in_flight): wait for replies")
        return False

    def parked(self, principal: str | None = None) -> int:
        """Parked calls of `principal`, or of everyone."""
        if principal is not None:
            return len(self._parked.get(principal, ()))
        return sum(map(len, self._parked.values()))

    def all_parked(self) -> Iterator[Call]:
        for calls in list(self._parked.values()):
            yield from list(calls)

    def park(self, call: Call, timeout_ms: int | None) -> object:
        """Hold `call` until an event answers it, or fail it with ETIMEDOUT at its deadline."""
        held = self._parked.get(call.caller.principal)
        if held is None:
            held = self._parked[call.caller.principal] = {}
        held[call] = None
        call.parked = True
        # A client that reuses a request id while the first is parked finds only the last.
        self._by_request[(call.route, call.id)] = call
        if timeout_ms is not None and call.deadline is None:
            call.deadline = self.after(timeout_ms / 1000, lambda: self.fail(
                call, abi.ErrorCode.ETIMEDOUT, f"{call.name}: timed out"))
        return PENDING

    def _unpark(self, call: Call) -> None:
        if not call.parked:  # answered as it ran: nothing to undo (the common case)
            return
        held = self._parked.get(call.caller.principal)
        if held is not None:
            held.pop(call, None)
            if not held:
                del self._parked[call.caller.principal]
        key = (call.route, call.id)
        if self._by_request.get(key) is call:
            del self._by_request[key]
        if call.deadline is not None:
            self.cancel_timer(call.deadline)

    def find_parked(self, route: bytes, request_id: int) -> Call | None:
        return self._by_request.get((route, request_id))

    def offload(self, call: Call) -> None:
        """`call` is being worked on by another thread of this process (a model, the embedder,
        the index, a tool's pool) until it is answered. While any is, the loop never spins on
        rings: a spinning loop would hold the GIL that thread needs."""
        self.offloaded += 1
        call.on_reply.append(self._unload)
        call.on_cancel.append(self._unload)

    def _unload(self, *_: Any) -> None:
        self.offloaded -= 1

    def cancel_of(self, principal: str, reason: str) -> None:
        """A dead principal's parked calls: out of its count at once (so a restart starts with
        none) and failed CANCEL_SLICE per loop iteration, so one that parked many cannot stall
        its neighbours' calls on its way out."""
        held = self._parked.pop(principal, None)
        if held:
            self._cancel_some(held, reason)

    def _cancel_some(self, calls: dict[Call, None], reason: str) -> None:
        for _ in range(min(CANCEL_SLICE, len(calls))):
            call, _ = calls.popitem()
            self.fail(call, abi.ErrorCode.ECANCELED, reason)
        if calls:
            self.after(0, lambda: self._cancel_some(calls, reason))

    # --- replies -----------------------------------------------------------------------------

    def reply(self, call: Call, result: Any) -> None:
        if call.done:
            return
        frame = (abi.encode_reply(call.id, result) if type(call.route) is not LocalRoute
                 else abi.Reply(call.id, result))
        call.done = True
        self.accounts.done(call, result)
        self._unpark(call)
        for settle in call.on_reply:
            settle(result)
        self.outbox.append([call.route, frame])

    def fail(self, call: Call, code: abi.ErrorCode, message: str) -> None:
        if call.done:
            return
        call.done = True
        self.accounts.failed(call, code)
        self._unpark(call)
        for cancel in call.on_cancel:
            cancel()
        self.send_error(call.route, call.id, code, message)

    def send_chunk(self, call: Call, data: Any) -> None:
        """A piece of a streamed result; the final reply or error still follows."""
        if call.done:
            return
        if type(call.route) is LocalRoute:
            self.outbox.append([call.route, abi.Chunk(call.id, data)])
        else:
            self.outbox.append([call.route, abi.encode(abi.Chunk(call.id, msgspec.Raw(
                abi.encode(data))))])

    def send_error(self, route: bytes, rid: int, code: abi.ErrorCode, message: str) -> None:
        """An error reply to request `rid` on `route`: for a call that never became one (a
        door's malformed frame, an unknown syscall) or through `fail`."""
        self.errors[code.name] += 1
        error = abi.Error(rid, int(code), message)
        self.outbox.append([route, error if type(route) is LocalRoute else abi.encode(error)])

    def take_outbox(self) -> list[list[Any]]:
        outbox, self.outbox = self.outbox, []
        return outbox
