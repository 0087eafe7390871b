"""Batched syscalls: many requests submitted with one doorbell, their replies collected together.

A `Batch` has the same families as a `Connection` (`b.sys`, `b.memory`, `b.fs`, ...); each call
returns a `Pending` at once. Leaving the `with` block (or `submit()`) sends them all: on the
ring path they fill the submission ring and the kernel is woken once, as io_uring_enter
submits a whole SQ; the kernel drains them in one loop round and commits them together. Calls
that stream (`llm.chat(stream=True)`) cannot be batched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdk import abi
from sdk.client import _budget, _final
from sdk.errors import InvalidArgument

if TYPE_CHECKING:
    from sdk.client import Connection


class Pending:
    """One batched call; `result()` is its value (or raises its error) once submitted."""

    __slots__ = ("_msg", "name", "result_type")

    def __init__(self, name: str, result_type: Any) -> None:
        self.name = name
        self.result_type = result_type
        self._msg: abi.Reply | abi.Error | None = None

    @property
    def done(self) -> bool:
        return self._msg is not None

    def result(self) -> Any:
        if self._msg is None:
            raise InvalidArgument(f"{self.name}: its batch has not been submitted")
        return _final(self._msg, self.result_type)


class Batch:
    def __init__(self, conn: Connection) -> None:
        from sdk.families import attach

        self._conn = conn
        self._calls: list[tuple[str, abi.Args | None, int | None]] = []
        self._waits: list[tuple[bool, float | None]] = []
        self._pending: list[Pending] = []
        attach(self)

    def __len__(self) -> int:
        return len(self._pending)

    def call(self, name: str, args: abi.Args | None = None, result_type: Any = Any, *,
             server_wait_ms: int | None = None, wait_forever: bool = False,
             timeout: float | None = None) -> Any:
        pending = Pending(name, result_type)
        self._calls.append((name, args, server_wait_ms))
        self._waits.append((wait_forever, timeout))
        self._pending.append(pending)
        return pending

    def stream(self, name: str, *_: Any, **__: Any) -> Any:
        raise InvalidArgument(f"{name}: a streamed call cannot be batched")

    def submit(self) -> list[Pending]:
        """Send every call added so far, wait for all their replies, and return them (in the
        order they were added). A lost kernel raises; a call's own error waits in its
        `Pending`."""
        calls, waits, pending = self._calls, self._waits, self._pending
        self._calls, self._waits, self._pending = [], [], []
        if not calls:
            return pending
        conn = self._conn
        rids = conn._send_many(calls)
        try:
            for rid, (name, _, wait_ms), (forever, timeout), slot in zip(
                    rids, calls, waits, pending, strict=True):
                budget = _budget(conn.timeout if timeout is None else timeout, wait_ms, forever)
                msg = conn._next(rid, name, budget)
                while isinstance(msg, abi.Chunk):
                    msg = conn._next(rid, name, budget)
                slot._msg = msg
        finally:
            for rid in rids:
                conn._done(rid)
        return pending

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.submit()
