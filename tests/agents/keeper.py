"""Keeps a note (a file) and a memory under its own name. Its task: `write` stores them,
`read` reports what it finds, `overwrite` reports what it finds and then replaces the note (what
an impostor under a past agent's name would do), `crash-once` stores them and fails on its
first run, so that a restart policy brings it back to report them."""

import sdk
from sdk import Agent

NOTE = "the keeper's private note"
MEMORY = "the keeper remembers this"


class Keeper(Agent):
    def run(self, task: str) -> dict:
        found = self.found()
        if task == "write" or (task == "crash-once" and found["note"] == "ENOENT"):
            self.fs.write("notes.txt", NOTE)
            self.memory.add(MEMORY)
            if task == "crash-once":
                raise RuntimeError("the first run fails on purpose")
            return self.found()
        if task == "overwrite":
            self.fs.write("notes.txt", "overwritten by an impostor")
        return found

    def found(self) -> dict:
        try:
            note = self.fs.read("notes.txt").decode()
        except sdk.SyscallError as exc:
            note = exc.code.name
        return {"note": note, "memories": [m.content for m in self.memory.list()]}
