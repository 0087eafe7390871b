"""Sends its task's second word to the agent named by its first word; returns "sent" or the
error code (the send may be held for a human's approval)."""

import sdk
from sdk import Agent


class Asker(Agent):
    def run(self, task: str) -> str:
        to, data = task.split(" ", 1)
        try:
            self.ipc.send(to, data)
        except sdk.SyscallError as exc:
            return exc.code.name
        return "sent"
