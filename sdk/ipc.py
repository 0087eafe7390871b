"""The `ipc` syscall family: capability-gated mailboxes between agents."""

from __future__ import annotations

from typing import Any

from sdk import abi
from sdk.proc import _ms
from sdk.syscalls import Family


class Ipc(Family):
    def send(self, to: str, data: Any) -> None:
        """Queue `data` (any msgpack value) in the mailbox of the running agent named `to`.

        Needs a capability `ipc.send@ipc/<to>`. Returns once the message is durable; if the
        token requires approval for it, only once a human approved it (the kernel's approval
        timeout bounds the wait).
        """
        return self._call("ipc.send", abi.SendArgs(to=to, data=data), wait_forever=True)

    def recv(self, timeout: float | None = None) -> abi.Message:
        """The oldest message in this agent's mailbox; waits up to `timeout` seconds (forever
        if None; ETIMEDOUT when it runs out)."""
        ms = _ms(timeout)
        return self._call("ipc.recv", abi.RecvArgs(timeout_ms=ms), server_wait_ms=ms,
                          wait_forever=ms is None)
