"""Tries to spawn a child with the rights given in its task; reports what the kernel said."""

import sdk
from sdk import Agent


class Spawner(Agent):
    def run(self, task: str) -> str:
        path, *caps = task.split()
        try:
            child = self.proc.spawn(path, caps=caps)
        except sdk.SyscallError as exc:
            return exc.code.name
        return f"spawned {child}"
