"""The `sys` syscall family: liveness and kernel statistics."""

from __future__ import annotations

from typing import Any

from sdk import abi


class System:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def null(self) -> None:
        """The cheapest round trip through the kernel: transport, token check, dispatch."""
        return self._conn.call("sys.null", None, type(None))

    def stats(self) -> abi.Stats:
        return self._conn.call("sys.stats", None, abi.Stats)
