"""The `sys` syscall family: liveness and kernel statistics."""

from __future__ import annotations

from sdk import abi
from sdk.syscalls import Family


class System(Family):
    def null(self) -> None:
        """The cheapest round trip through the kernel: transport, token check, dispatch."""
        return self._call("sys.null")

    def stats(self) -> abi.Stats:
        return self._call("sys.stats")
