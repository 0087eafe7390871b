"""The kernel's SQLite database: schema, migrations and group commit.

One connection, used only by the dispatch thread. Writes of a loop iteration share one
transaction that is committed before any reply of that iteration is sent, so everything
acknowledged is durable (WAL, synchronous=FULL) and fsyncs are amortised over a batch.

A storage fault (disk full, an I/O error, a read-only file) can make SQLite roll the whole
transaction back, at a statement or at COMMIT; the database then says so (`StorageFault` from
`commit`), and the loop answers that batch's calls with the fault instead of acknowledging
writes that are not there.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = [
    # version 1
    """
    CREATE TABLE agents (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        name        TEXT NOT NULL,
        path        TEXT NOT NULL,
        argv        TEXT NOT NULL,
        caps        TEXT NOT NULL,
        token_id    TEXT,
        spawned_by  TEXT NOT NULL,
        pid         INTEGER,
        pid_start   INTEGER,
        state       TEXT NOT NULL,
        started_at  REAL,
        ended_at    REAL,
        exit_status INTEGER,
        result      BLOB
    );
    CREATE INDEX agents_state ON agents(state);
    CREATE TABLE tokens (
        id         TEXT PRIMARY KEY,
        parent     TEXT,
        subject    TEXT NOT NULL,
        issued_at  REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL
    );
    CREATE TABLE messages (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        receiver  INTEGER NOT NULL,
        sender    TEXT NOT NULL,
        sender_id INTEGER,
        data      BLOB NOT NULL,
        sent_at   REAL NOT NULL
    );
    CREATE INDEX messages_receiver ON messages(receiver, seq);
    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        ts        REAL NOT NULL,
        principal TEXT NOT NULL,
        event     TEXT NOT NULL,
        detail    TEXT NOT NULL,
        prev      TEXT NOT NULL,
        hash      TEXT NOT NULL
    );
    """,
    # version 2: the sandbox an agent runs in, its restart policy, its capped logs
    """
    ALTER TABLE agents ADD COLUMN sandbox TEXT;
    ALTER TABLE agents ADD COLUMN layers TEXT;
    ALTER TABLE agents ADD COLUMN uid INTEGER;
    ALTER TABLE agents ADD COLUMN limits TEXT;
    ALTER TABLE agents ADD COLUMN restart TEXT NOT NULL DEFAULT 'no';
    ALTER TABLE agents ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN log_dropped INTEGER NOT NULL DEFAULT 0
    """,
    # version 3: the access manager's budget counters and used one-shot nonces; an agent's
    # privilege group (re-granted when it restarts)
    """
    ALTER TABLE agents ADD COLUMN grp TEXT;
    CREATE INDEX tokens_parent ON tokens(parent);
    CREATE INDEX tokens_subject ON tokens(subject);
    CREATE TABLE budgets (
        id       TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        used     INTEGER NOT NULL
    );
    CREATE TABLE nonces (
        nonce    TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        used_at  REAL NOT NULL
    );
    """,
    # version 4: the memory manager (memories, their keyword index) and the storage manager
    # (files and their versions; contents are content-addressed blobs under STATE/blobs)
    """
    CREATE TABLE memories (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace  TEXT NOT NULL,
        content    TEXT NOT NULL,
        metadata   TEXT NOT NULL,
        size       INTEGER NOT NULL,
        embedding  BLOB,
        embedder   TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX memories_namespace ON memories(namespace, id);
    CREATE VIRTUAL TABLE memories_fts USING fts5(content, content='memories', content_rowid='id');
    CREATE TABLE fs_files (
        owner      TEXT NOT NULL,
        path       TEXT NOT NULL,
        kind       TEXT NOT NULL,
        head       INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        memory_id  INTEGER,
        PRIMARY KEY (owner, path)
    );
    CREATE TABLE fs_versions (
        owner      TEXT NOT NULL,
        path       TEXT NOT NULL,
        version    INTEGER NOT NULL,
        blob       TEXT NOT NULL,
        size       INTEGER NOT NULL,
        created_at REAL NOT NULL,
        op         TEXT NOT NULL,
        PRIMARY KEY (owner, path, version)
    );
    CREATE INDEX fs_versions_blob ON fs_versions(blob);
    """,
    # version 5: agent names are owned (kernel/access/names.py): the principal that last started
    # an agent under each name, taken over from the agents already in the table
    """
    CREATE TABLE names (
        name       TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        agent_id   INTEGER NOT NULL,
        claimed_at REAL NOT NULL
    );
    INSERT INTO names (name, owner, agent_id, claimed_at)
        SELECT name, spawned_by, MAX(id), COALESCE(started_at, 0) FROM agents GROUP BY name;
    """,
    # version 6: an agent's default model and the virtual environment that runs it
    """
    ALTER TABLE agents ADD COLUMN model TEXT;
    ALTER TABLE agents ADD COLUMN venv TEXT
    """,
]


class StorageFault(Exception):
    """The batch's transaction is gone: `code` is the ABI error name (ENOSPC or EIO)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def storage_fault(exc: BaseException) -> StorageFault | None:
    """The typed fault an exception from the disk or SQLite stands for; None if it is not
    one (a bug, to be reported as such)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFault("ENOSPC", f"the kernel's disk is full: {exc.strerror}")
    if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.EROFS):
        return StorageFault("EIO", f"the kernel's disk failed: {exc.strerror}")
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        return StorageFault("ENOSPC", "the kernel's disk is full (database)")
    if name.startswith(("SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return StorageFault("EIO", f"the kernel's database cannot be written ({name})")
    return None


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self._in_call = self._savepoint = False
        self.lost: StorageFault | None = None  # the open batch was rolled back under us
        self.faults = 0  # batches lost to storage faults
        self.commits = 0  # batches committed: other threads tell from it what is durable
        self._migrate()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(SCHEMA):
            raise RuntimeError(f"{self.path} has schema {version}, newer than this kernel knows")
        for number, script in enumerate(SCHEMA[version:], start=version + 1):
            self.conn.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, script.split(";")):
                self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version={number}")
            self.conn.execute("COMMIT")

    def write(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        """Run a write inside the current batch's transaction (opened on first use) and, during
        a syscall, inside that syscall's savepoint."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
        if self._in_call and not self._savepoint:
            self.conn.execute("SAVEPOINT syscall")
            self._savepoint = True
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            if not self.conn.in_transaction:  # SQLite rolled back the batch, not just this
                self.lost = self.lost or storage_fault(exc) or StorageFault("EIO", str(exc))
                self._savepoint = False
            raise

    def begin_call(self) -> None:
        self._in_call, self._savepoint = True, False

    def end_call(self, ok: bool) -> None:
        """Keep a syscall's writes, or undo them all if it failed halfway."""
        if self._savepoint and self.conn.in_transaction:
            if not ok:
                self.conn.execute("ROLLBACK TO syscall")
            self.conn.execute("RELEASE syscall")
        self._in_call = self._savepoint = False

    def read(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def commit(self) -> None:
        """Make the batch durable, or raise StorageFault if it is not (then it is gone: the
        database holds what it held before the batch)."""
        lost, self.lost = self.lost, None
        if self.conn.in_transaction:
            if lost is not None:
                self.conn.execute("ROLLBACK")  # the batch's start is gone: none of it stays
            else:
                try:
                    self.conn.execute("COMMIT")
                    self.commits += 1
                    return
                except sqlite3.Error as exc:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    lost = storage_fault(exc) or StorageFault("EIO", str(exc))
        if lost is not None:
            self.faults += 1
            raise lost

    def close(self) -> None:
        self.commit()
        self.conn.close()
