"""The child of swapper.py. Its first run copies its own code into its home (where
`/proc/self/cwd` leads the agent once the parent swapped its code directory), says `ready`,
waits for a message and fails, so that its restart policy starts it again. A later run
reports what it sees of the host."""

import errno
import json
import os
import shutil
import sys
from pathlib import Path

from sdk import Agent


def probe(fn) -> object:
    try:
        return fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


class Swapped(Agent):
    def run(self, task: str) -> dict:
        home = Path(os.environ["HOME"])
        if not (home / "x.py").exists():
            shutil.copyfile(task, home / "x.py")
            print("ready", flush=True)
            self.ipc.recv()
            sys.exit(1)
        seen = {"list_root": probe(lambda: sorted(os.listdir("/"))),
                "passwd": probe(lambda: Path("/etc/passwd").read_text()[:64])}
        print(json.dumps(seen), flush=True)
        return seen
