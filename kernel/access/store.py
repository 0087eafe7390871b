"""What the access manager keeps on disk: the token tree, revocations, budget marks and used
one-shot nonces (SQLite tables in `kernel.db`), and the token key file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.state import write_private

if TYPE_CHECKING:
    from kernel.access.rules import Capability
    from kernel.db import Database

TokenRow = tuple[str, str | None, str, float, float | None, float | None]


class AccessStore:
    def __init__(self, db: Database, key_path: Path) -> None:
        self.db = db
        self.key_path = key_path

    # --- loaded at boot ------------------------------------------------------------------------

    def revoked(self) -> set[str]:
        rows = self.db.read("SELECT id FROM tokens WHERE revoked_at IS NOT NULL")
        return {row[0] for row in rows}

    def budgets(self) -> dict[str, int]:
        return {counter: used for counter, used in self.db.read("SELECT id, used FROM budgets")}

    def nonces(self) -> set[str]:
        return {row[0] for row in self.db.read("SELECT nonce FROM nonces")}

    # --- the token tree ------------------------------------------------------------------------

    def record(self, cap: Capability) -> None:
        self.db.write("INSERT INTO tokens (id, parent, subject, issued_at, expires_at) "
                      "VALUES (?,?,?,?,?)",
                      (cap.token_id, cap.parent_id, cap.subject, cap.issued_at, cap.expires_at))

    def exists(self, token_id: str) -> bool:
        return bool(self.db.read("SELECT 1 FROM tokens WHERE id=?", (token_id,)))

    def parent(self, token_id: str) -> tuple[str | None] | None:
        """(parent id,) of a recorded token, or None if it is not recorded."""
        rows = self.db.read("SELECT parent FROM tokens WHERE id=?", (token_id,))
        return (rows[0][0],) if rows else None

    def children(self, token_ids: list[str]) -> list[str]:
        marks = ",".join("?" * len(token_ids))
        return [row[0] for row in self.db.read(
            f"SELECT id FROM tokens WHERE parent IN ({marks})", token_ids)]

    def unrevoked(self, subject: str | None = None, *, agents: bool = False) -> list[str]:
        """Ids of unrevoked tokens: of `subject`, of every agent (`agents`), or all."""
        sql, params = "SELECT id FROM tokens WHERE revoked_at IS NULL", ()
        if subject is not None:
            sql, params = sql + " AND subject=?", (subject,)
        elif agents:
            sql += " AND subject LIKE 'agent:%'"
        return [row[0] for row in self.db.read(sql, params)]

    def revoke(self, token_id: str, at: float) -> None:
        self.db.write("UPDATE tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                      (at, token_id))

    def revoke_all(self, at: float) -> list[str]:
        ids = self.unrevoked()
        self.db.write("UPDATE tokens SET revoked_at=? WHERE revoked_at IS NULL", (at,))
        return ids

    def revoked_at(self, token_id: str) -> float | None:
        rows = self.db.read("SELECT revoked_at FROM tokens WHERE id=?", (token_id,))
        return rows[0][0] if rows else None

    def tokens(self, *, live_at: float | None, subject: str | None) -> list[TokenRow]:
        """Recorded tokens by issue time: unrevoked and unexpired at `live_at` unless None,
        of `subject` if given."""
        where: list[str] = []
        params: list[Any] = []
        if live_at is not None:
            where.append("revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)")
            params.append(live_at)
        if subject is not None:
            where.append("subject=?")
            params.append(subject)
        sql = "SELECT id, parent, subject, issued_at, expires_at, revoked_at FROM tokens"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self.db.read(sql + " ORDER BY issued_at", params)

    # --- one-shot nonces and budgets -----------------------------------------------------------

    def use_nonce(self, nonce: str, token_id: str, at: float) -> None:
        self.db.write("INSERT OR IGNORE INTO nonces VALUES (?,?,?)", (nonce, token_id, at))

    def write_mark(self, counter: str, token_id: str, mark: int) -> None:
        self.db.write("INSERT INTO budgets VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET "
                      "used=excluded.used", (counter, token_id, mark))

    def write_used(self, counts: Iterable[tuple[str, int]]) -> None:
        for counter, used in counts:
            self.db.write("UPDATE budgets SET used=? WHERE id=?", (used, counter))

    # --- the key -------------------------------------------------------------------------------

    def write_key(self, key: bytes) -> None:
        write_private(self.key_path, key)
