"""The call vocabulary every room speaks: a syscall in flight, who made it, how it is refused.

A leaf: it imports no room of the kernel, so any room (a manager, a door, access) may import
it without importing the loop that runs calls (kernel/core.py). `Calls` is the one service a
room gets from the kernel (kernel/switchboard.py implements it); each room names in its
constructor the few other rooms it needs, never the `Kernel`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sdk import abi


class LocalRoute(bytes):
    """The route of a call made inside the kernel process (the HTTP door's): its reply,
    chunks and error reach the door as structs holding the result object, never encoded."""


class Fault(Exception):
    """A handler's typed refusal: becomes an `Error` reply with this code."""

    def __init__(self, code: abi.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


PENDING = object()  # a handler's return value meaning "the reply comes later"


@dataclass(frozen=True, slots=True)
class Caller:
    principal: str  # "agent:<id>", "user:<uid>", "remote:<name>" or "http:<name>"
    agent_id: int | None


@dataclass(order=True, slots=True)
class Timer:
    """A callback due at `when` (monotonic); `fn` is None once cancelled (see `Calls.after`)."""

    when: float
    seq: int
    fn: Callable[[], None] | None = field(compare=False)


@dataclass(eq=False, slots=True)
class Call:
    """One syscall in flight: where its reply goes and whether it has been answered."""

    route: bytes
    id: int
    name: str
    caller: Caller
    timeout_ms: int | None = None  # the caller's deadline for the whole call, if any
    # The verified `kernel.access.tokens.Capability`, set once the access check passed (typed
    # loosely so this leaf imports no room).
    capability: Any = None
    done: bool = False
    on_cancel: list[Callable[[], None]] = field(default_factory=list)
    on_reply: list[Callable[[Any], None]] = field(default_factory=list)  # given the result
    started: float = field(default_factory=time.monotonic)  # for the latency histograms
    deadline: Timer | None = None  # the timer that fails it with ETIMEDOUT, while parked
    parked: bool = False  # held by `Calls.park` at some point (most calls never are)


class Calls(Protocol):
    """What a room may do with calls and the loop: the switchboard's face to the managers."""

    draining: bool  # the kernel is stopping: refuse new long work

    def park(self, call: Call, timeout_ms: int | None) -> object:
        """Hold `call` until an event answers it (or ETIMEDOUT at its deadline); PENDING."""
        ...

    def reply(self, call: Call, result: Any) -> None: ...

    def fail(self, call: Call, code: abi.ErrorCode, message: str) -> None: ...

    def send_chunk(self, call: Call, data: Any) -> None:
        """A piece of a streamed result; the final reply or error still follows."""
        ...

    def offload(self, call: Call) -> None:
        """`call` is being worked on by another thread until it is answered."""
        ...

    def find_parked(self, route: bytes, request_id: int) -> Call | None: ...

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread soon (from any thread)."""
        ...

    def after(self, seconds: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` on the loop in `seconds`."""
        ...

    def cancel_timer(self, timer: Timer) -> None: ...
