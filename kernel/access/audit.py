"""The audit log: an append-only, hash-chained table of security-relevant events."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from kernel.db import Database

GENESIS = "0" * 64


def _digest(prev: str, seq: int, ts: float, principal: str, event: str, detail: str) -> str:
    record = json.dumps([prev, seq, repr(ts), principal, event, detail], separators=(",", ":"))
    return hashlib.sha256(record.encode()).hexdigest()


class AuditLog:
    """Each row carries the hash of the previous one, so editing or deleting any row breaks
    every hash after it (`verify`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        row = db.read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        self._seq, self._last = (row[0][0], row[0][1]) if row else (0, GENESIS)

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
        """The seq of the first row whose chain is broken, or None if the log is intact."""
        prev, expect = GENESIS, 1
        for seq, ts, principal, event, detail, row_prev, digest in self.db.read(
                "SELECT seq, ts, principal, event, detail, prev, hash FROM audit ORDER BY seq"):
            if seq != expect or row_prev != prev or digest != _digest(
                    prev, seq, ts, principal, event, detail):
                return seq
            prev, expect = digest, seq + 1
        return None
