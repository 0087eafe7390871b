"""Presents a token that is not its own (given as its task) and reports what the kernel said."""

import os

import sdk
from sdk import Agent


class Thief(Agent):
    def run(self, task: str) -> dict:
        with sdk.connect(os.environ["AGENTOS_ENDPOINT"], task.strip()) as stolen:
            try:
                stolen.sys.null()
                return {"null": "ok"}
            except sdk.SyscallError as exc:
                return {"null": exc.code.name, "message": exc.message}
