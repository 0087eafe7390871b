"""Starts children as its task (a JSON list of steps) says and reports what became of each:
the kernel's refusal (an error code), `spawned ID`, or with `wait` the child's result. A step's
code may first be copied into this agent's home (`copy_as`, a path relative to it), made
readable to a child of another uid, as an agent starting code of its own would."""

import json
import os
import shutil
from pathlib import Path

import sdk
from sdk import Agent


class Parent(Agent):
    def run(self, task: str) -> list:
        said: list = []
        for step in json.loads(task):
            path = step.pop("path")
            wait = step.pop("wait", False)
            copy_as = step.pop("copy_as", None)
            if copy_as is not None:
                home = Path(os.environ["HOME"])
                target = home / copy_as
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                home.chmod(0o711)
                target.parent.chmod(0o755)
                target.chmod(0o644)
                path = str(target)
            try:
                child = self.proc.spawn(path, **step)
            except sdk.SyscallError as exc:
                said.append(exc.code.name)
                continue
            said.append(self.proc.wait(child, timeout=60).result if wait else f"spawned {child}")
        return said
