"""The audit log: an append-only, hash-chained table of security-relevant events.

The chain's head (newest seq and hash) is also anchored in a file outside the database after
every commit that added rows (`anchor`), so deleting the newest rows, which leaves a valid
shorter chain, is detected too (`verify`). A crash between the commit and the anchor leaves the
anchor one batch behind, which verifies; rows of that last batch are the only ones whose
truncation could go unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from kernel.db import Database
from kernel.state import write_private

GENESIS = "0" * 64


def _digest(prev: str, seq: int, ts: float, principal: str, event: str, detail: str) -> str:
    record = json.dumps([prev, seq, repr(ts), principal, event, detail], separators=(",", ":"))
    return hashlib.sha256(record.encode()).hexdigest()


class AuditLog:
    """Each row carries the hash of the previous one, so editing or deleting any row breaks
    every hash after it (`verify`)."""

    def __init__(self, db: Database, anchor_path: Path | None = None) -> None:
        self.db = db
        self.anchor_path = anchor_path
        self.reload()
        self._anchored = self.anchored()[0]

    def reload(self) -> None:
        """Take the chain's head from the database (again, after a batch was rolled back)."""
        row = self.db.read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        self._seq, self._last = (row[0][0], row[0][1]) if row else (0, GENESIS)

    def anchored(self) -> tuple[int, str]:
        """The (seq, hash) last written outside the database; (0, GENESIS) if none."""
        if self.anchor_path is None:
            return 0, GENESIS
        try:
            seq, digest = self.anchor_path.read_text().split()
            return int(seq), digest
        except FileNotFoundError:
            return 0, GENESIS
        except ValueError:
            return -1, "unreadable"

    def anchor(self) -> None:
        """Record the committed head outside the database; call after each commit."""
        if self.anchor_path is not None and self._seq != self._anchored:
            write_private(self.anchor_path, f"{self._seq} {self._last}\n".encode())
            self._anchored = self._seq

    def append(self, principal: str, event: str, **detail: Any) -> int:
        self._seq += 1
        ts = time.time()
        text = json.dumps(detail, sort_keys=True, default=str, separators=(",", ":"))
        digest = _digest(self._last, self._seq, ts, principal, event, text)
        self.db.write("INSERT INTO audit VALUES (?,?,?,?,?,?,?)",
                      (self._seq, ts, principal, event, text, self._last, digest))
        self._last = digest
        return self._seq

    def rows(self, since: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.read("SELECT seq, ts, principal, event, detail FROM audit WHERE seq > ? "
                            "ORDER BY seq LIMIT ?", (since, limit))
        return [{"seq": s, "ts": t, "principal": p, "event": e, "detail": json.loads(d)}
                for s, t, p, e, d in rows]

    def verify(self) -> int | None:
        """The seq of the first row whose chain is broken, or None if the log is intact. Rows
        missing at the end, up to the anchored head, count as broken at the first one missing."""
        anchored_seq, anchored_hash = self.anchored()
        prev, expect, at_anchor = GENESIS, 1, GENESIS
        for seq, ts, principal, event, detail, row_prev, digest in self.db.read(
                "SELECT seq, ts, principal, event, detail, prev, hash FROM audit ORDER BY seq"):
            if seq != expect or row_prev != prev or digest != _digest(
                    prev, seq, ts, principal, event, detail):
                return seq
            prev, expect = digest, seq + 1
            if seq == anchored_seq:
                at_anchor = digest
        if anchored_seq < 0:
            return expect
        if anchored_seq >= expect:
            return expect  # rows up to the anchor were removed
        if at_anchor != anchored_hash:
            return anchored_seq
        return None
