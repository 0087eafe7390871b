"""Host-wide leases on agent and tool uids, so kernels side by side never share one.

A reap kills every process of the agent's uid, so a uid must belong to one agent of one kernel
from its allocation until its last cleanup. Looking for processes of a uid (what
`sandbox.allocate_uid` does) is not enough: between an agent's exit and its kernel's reap,
another kernel sees the uid idle, takes it, and the first kernel's reap kills its new owner.
A lease is an exclusive `flock` on `/run/agentos/uids/<uid>`, held by the kernel process as
long as the uid is its own; the kernel's death releases it, so a crashed kernel leaks none.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("kernel.proc")

LEASE_DIR = Path("/run/agentos/uids")


class UidLeases:
    """The uids this kernel holds, by owner (an agent id or a tool's key)."""

    def __init__(self, directory: Path = LEASE_DIR) -> None:
        self.directory = directory
        self._fds: dict[int, int] = {}  # uid -> the open lock file
        self._owner: dict[object, int] = {}  # owner -> uid
        self._ready = False

    def _open_dir(self) -> None:
        if not self._ready:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._ready = True

    def take(self, uid: int, owner: object) -> bool:
        """Lease `uid` for `owner`; False if another kernel holds it. Taking a uid this kernel
        already holds for the same owner (a restart) succeeds; for another owner, it fails."""
        held = self._owner.get(owner)
        if held == uid:
            return True
        if uid in self._fds:
            return False  # this kernel's, for another owner
        self._open_dir()
        fd = os.open(self.directory / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if held is not None:
            self.release(owner)  # an owner holds one uid at a time
        self._fds[uid] = fd
        self._owner[owner] = uid
        return True

    def release(self, owner: object) -> None:
        """The owner is over: its uid may go to anyone. The lock file stays (unlinking it
        would race with a kernel about to lock it)."""
        uid = self._owner.pop(owner, None)
        if uid is not None:
            os.close(self._fds.pop(uid))

    def held(self, uid: int) -> bool:
        return uid in self._fds

    def __len__(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._owner.clear()
