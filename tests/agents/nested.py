"""Tries to start children with the options in its task (a JSON list of spawn keyword
arguments); returns what the kernel said to each."""

import json

import sdk
from sdk import Agent


class Nested(Agent):
    def run(self, task: str) -> list:
        said = []
        for kwargs in json.loads(task):
            try:
                said.append(f"spawned {self.proc.spawn(**kwargs)}")
            except sdk.SyscallError as exc:
                said.append(exc.code.name)
        return said
