"""An agent's captured stream: a pipe the kernel drains into a log file, up to a size cap.

The agent writes into a pipe, never into the file: past the cap the kernel keeps reading (so
the agent is not blocked forever) but drops and counts the bytes, so no agent can fill the
disk. Each readiness event reads a bounded amount, so a flooding agent gets backpressure
(its pipe fills and its writes block) instead of the dispatch loop's time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

READ_BUDGET = 256 * 1024  # bytes taken from one pipe per loop iteration
CHUNK = 64 * 1024


class LogPump:
    def __init__(self, agent_id: int, stream: str, read_fd: int, open_log: Callable[[], int],
                 cap: int) -> None:
        self.agent_id = agent_id
        self.stream = stream
        self.fd = read_fd
        # The log file is opened only while there is something to write: an idle agent costs
        # the kernel its pipe, not a file too (fds are what limits how many agents it holds),
        # and a spawn does not wait for a file to be made (`logs` reads a missing one as
        # empty).
        self.open_log = open_log
        self.size = -1  # what the log holds, read at the first write (a restart appends)
        self.cap = cap
        self.dropped = 0
        self.capped = False  # the cap was reached during this run (audited once)
        os.set_blocking(read_fd, False)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def pump(self, budget: int = READ_BUDGET) -> bool:
        """Move what the pipe holds, at most `budget` bytes; False once the writers are gone."""
        log_fd = -1
        try:
            while budget > 0:
                try:
                    data = os.read(self.fd, min(CHUNK, budget))
                except BlockingIOError:
                    return True
                except OSError:
                    return False
                if not data:
                    return False
                budget -= len(data)
                keep = b""
                try:
                    if self.size < self.cap:  # or not known yet (-1)
                        if log_fd < 0:
                            log_fd = self.open_log()
                        if self.size < 0:
                            self.size = os.fstat(log_fd).st_size
                        keep = data[:max(0, self.cap - self.size)]
                        if keep:
                            os.write(log_fd, keep)
                            self.size += len(keep)
                except OSError:
                    keep = b""  # the disk is full or the log is gone: drop, never stall
                if len(keep) < len(data):
                    self.dropped += len(data) - len(keep)
                    self.capped = True
            return True
        finally:
            if log_fd >= 0:
                os.close(log_fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
