"""Host-wide leases on agent and tool uids, so kernels side by side never share one.

A reap kills every process of the agent's uid, so a uid must belong to one agent of one kernel
from its allocation until its last cleanup. Looking for processes of a uid (what
`sandbox.allocate_uid` does) is not enough: between an agent's exit and its kernel's reap,
another kernel sees the uid idle, takes it, and the first kernel's reap kills its new owner.
A lease is an exclusive open-file-description lock (`F_OFD_SETLK`) on byte `<uid>` of one file,
`/run/agentos/uids.lock`, held by the kernel as long as the uid is its own; the kernel's death
releases it, so a crashed kernel leaks none. One fd holds every lease of a kernel (a file and an
fd per uid would cost an fd per agent, and fds are what bound how many agents a kernel holds);
OFD locks of two kernels conflict, those of one never do, so the kernel keeps its own set too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger("kernel.proc")

LEASE_FILE = Path("/run/agentos/uids.lock")
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux's number, where Python lacks the name


def _lock(fd: int, kind: int, uid: int) -> None:
    """`kind` (F_WRLCK or F_UNLCK) on byte `uid`; BlockingIOError if another holds it. struct
    flock: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid (0 for OFD locks)."""
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, uid, 1, 0))


class UidLeases:
    """The uids this kernel holds, by owner (an agent id or a tool's key)."""

    def __init__(self, path: Path = LEASE_FILE) -> None:
        self.path = path
        self._fd = -1  # the lock file, opened at the first lease
        self._uids: set[int] = set()
        self._owner: dict[object, int] = {}  # owner -> uid

    def take(self, uid: int, owner: object) -> bool:
        """Lease `uid` for `owner`; False if another kernel holds it. Taking a uid this kernel
        already holds for the same owner (a restart) succeeds; for another owner, it fails."""
        held = self._owner.get(owner)
        if held == uid:
            return True
        if uid in self._uids:
            return False  # this kernel's, for another owner
        if self._fd < 0:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _lock(self._fd, fcntl.F_WRLCK, uid)
        except (BlockingIOError, PermissionError):
            return False  # EAGAIN or EACCES: another kernel's
        if held is not None:
            self.release(owner)  # an owner holds one uid at a time
        self._uids.add(uid)
        self._owner[owner] = uid
        return True

    def release(self, owner: object) -> None:
        """The owner is over: its uid may go to anyone."""
        uid = self._owner.pop(owner, None)
        if uid is not None:
            self._uids.discard(uid)
            _lock(self._fd, fcntl.F_UNLCK, uid)

    def held(self, uid: int) -> bool:
        return uid in self._uids

    def __len__(self) -> int:
        return len(self._uids)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # every lease with it
            self._fd = -1
        self._uids.clear()
        self._owner.clear()
