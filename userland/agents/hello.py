"""The demo agent: greets the kernel through every syscall family that exists so far.

    agentos run userland/agents/hello.py -- "your task here"
"""

from __future__ import annotations

import time

from sdk import Agent, PermissionDenied


class Hello(Agent):
    def run(self, task: str) -> dict:
        start = time.perf_counter()
        for _ in range(100):
            self.sys.null()
        null_us = (time.perf_counter() - start) / 100 * 1e6
        me = self.proc.info(self.id)
        stats = self.sys.stats()
        # No capability names another agent's mailbox, so this must be refused.
        try:
            self.ipc.send("nobody", "hi")
            send = "allowed?!"
        except PermissionDenied as exc:
            send = f"refused as it should be ({exc.code.name})"
        print(f"hello from agent {me.id} ({me.name}), pid {me.pid}")
        return {
            "task": task or "(none)",
            "agent": me.id,
            "kernel": f"agentos {stats.version}, ABI {stats.abi}",
            "null_syscall_us": round(null_us, 1),
            "ipc_send_without_capability": send,
        }
