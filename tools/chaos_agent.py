"""The chaos harness's writer agent: memories and files as itself at full speed, each
acknowledged write logged to the file named by its task, until the kernel under it dies."""

import hashlib
import os
import sys

from sdk import Agent, SyscallError


class ChaosWriter(Agent):
    def run(self, task: str) -> None:
        # The log survives the agent (page cache), so no fsync: the kernel is what gets killed.
        fd = os.open(task, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        pid, n = os.getpid(), 0
        try:
            while True:
                n += 1
                text = f"{self.name} {pid} {n} " + "w" * (n * 37 % 3000)
                digest = hashlib.sha256(text.encode()).hexdigest()
                if n % 2:
                    memory_id = self.memory.add(text, {"n": n})
                    line = f"mem {memory_id} {digest}\n"
                else:
                    stat = self.fs.write(f"w/f{n % 5}", text)
                    line = f"fs w/f{n % 5} {stat.version} {stat.sha256}\n"
                os.write(fd, line.encode())
        except SyscallError as exc:  # the kernel went away: what was acknowledged is logged
            print(f"stopped at {n}: {exc.code.name}", file=sys.stderr)
