"""The storage manager: each agent's file namespace, versioned, quota'd and searchable.

A file is a row in `fs_files` whose `head` names its current version in `fs_versions`; each
version names a content-addressed blob. A write puts (and fsyncs) the blob first, then adds the
version row in the caller's batch transaction, so the reply, sent after the commit, never
acknowledges a version whose bytes are not on disk, and a crash in between leaves only an
unreferenced blob (collected at boot). Blobs are deleted only after the commit that stopped
naming them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from kernel.call import Call, Calls, Fault
from kernel.storage import paths
from kernel.storage.blobs import BlobError, BlobStore
from sdk import abi
from sdk.tokens import Rule

if TYPE_CHECKING:
    from kernel.access.approvals import Approvals
    from kernel.access.audit import AuditLog
    from kernel.access.manager import AccessManager
    from kernel.config import Config
    from kernel.db import Database
    from kernel.memory.manager import MemoryManager
    from kernel.proc.table import ProcessTable
    from kernel.state import StateDir

log = logging.getLogger("kernel.storage")

SHAREABLE = ("fs.read", "fs.stat", "fs.list", "fs.versions", "fs.search", "fs.write",
             "fs.append", "fs.mkdir", "fs.rollback")
SNIPPET_CHARS = 160
INDEX_CHARS = 4096  # how much of a text file fs.search embeds


class StorageManager:
    def __init__(self, *, access: AccessManager, approvals: Approvals, audit: AuditLog,
                 calls: Calls, config: Config, db: Database, memory: MemoryManager,
                 procs: ProcessTable, state: StateDir) -> None:
        self.access = access
        self.approvals = approvals
        self.audit = audit
        self.calls = calls
        self.config = config
        self.db = db
        self.memory = memory
        self.procs = procs
        self.state = state
        self.blobs = BlobStore(state.root / "blobs")
        self._used: dict[str, int] = {}
        self._garbage: set[str] = set()

    def start(self) -> None:
        """Crash recovery: drop half-written temporaries and blobs no version names."""
        self.blobs.clean_temporaries()
        named = {r[0] for r in self.db.read("SELECT DISTINCT blob FROM fs_versions")}
        orphans = self.blobs.all() - named
        for digest in orphans:
            self.blobs.delete(digest)
        if orphans:
            log.info("unreferenced blobs collected", extra={"count": len(orphans)})

    # --- helpers -------------------------------------------------------------------------------

    def forget_usage(self) -> None:
        """Sum the owners' usage again from the database (a batch was rolled back)."""
        self._used.clear()

    def used(self, owner: str) -> int:
        if owner not in self._used:
            self._used[owner] = self.db.read(
                "SELECT COALESCE(SUM(size), 0) FROM fs_versions WHERE owner=?", (owner,))[0][0]
        return self._used[owner]

    def _node(self, owner: str, path: str) -> tuple[str, int, float, int | None] | None:
        rows = self.db.read("SELECT kind, head, created_at, memory_id FROM fs_files "
                              "WHERE owner=? AND path=?", (owner, path))
        return tuple(rows[0]) if rows else None  # type: ignore[return-value]

    def _file(self, owner: str, path: str) -> tuple[int, int | None]:
        node = self._node(owner, path)
        if node is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no such file: {path}")
        if node[0] != "file":
            raise Fault(abi.ErrorCode.EINVAL, f"{path} is a directory")
        return node[1], node[3]

    def _version(self, owner: str, path: str, version: int) -> tuple[str, int, float, str]:
        rows = self.db.read("SELECT blob, size, created_at, op FROM fs_versions "
                              "WHERE owner=? AND path=? AND version=?", (owner, path, version))
        if not rows:
            raise Fault(abi.ErrorCode.ENOENT, f"{path} has no version {version}")
        return tuple(rows[0])  # type: ignore[return-value]

    def _read_blob(self, digest: str) -> bytes:
        try:
            return self.blobs.get(digest)
        except BlobError as exc:
            log.error("blob unreadable", extra={"blob": digest, "error": str(exc)})
            raise Fault(abi.ErrorCode.EIO, str(exc)) from None

    def _mkparents(self, owner: str, path: str, now: float) -> None:
        for parent in paths.parents(path):
            node = self._node(owner, parent)
            if node is None:
                self.db.write("INSERT INTO fs_files (owner, path, kind, created_at) "
                                "VALUES (?,?,?,?)", (owner, parent, "dir", now))
            elif node[0] != "dir":
                raise Fault(abi.ErrorCode.EINVAL, f"{parent} is a file, not a directory")

    def _commit_version(self, owner: str, path: str, data: bytes, op: str) -> abi.FsStat:
        """Make `data` the newest version of `path` (blob first, then metadata)."""
        limit = self.config.fs_file_bytes
        if len(data) > limit:
            raise Fault(abi.ErrorCode.EINVAL, f"file would be {len(data)} bytes, over the "
                         f"{limit}-byte limit")
        quota = self.config.fs_quota
        if self.used(owner) + len(data) > quota:
            raise Fault(abi.ErrorCode.EQUOTA, f"{owner} would store {self.used(owner) + len(data)}"
                         f" bytes, over its {quota}-byte quota (delete files or old versions)")
        now = time.time()
        node = self._node(owner, path)
        if node is not None and node[0] != "file":
            raise Fault(abi.ErrorCode.EINVAL, f"{path} is a directory")
        self._mkparents(owner, path, now)
        digest = self.blobs.put(data)  # durable before any row names it
        version = (node[1] if node else 0) + 1
        self.db.write("INSERT INTO fs_versions (owner, path, version, blob, size, created_at, "
                        "op) VALUES (?,?,?,?,?,?,?)", (owner, path, version, digest, len(data),
                                                       now, op))
        if node is None:
            self.db.write("INSERT INTO fs_files (owner, path, kind, head, created_at) "
                            "VALUES (?,?,?,?,?)", (owner, path, "file", version, now))
        else:
            self.db.write("UPDATE fs_files SET head=? WHERE owner=? AND path=?",
                            (version, owner, path))
        self._used[owner] = self.used(owner) + len(data)
        self._retain(owner, path, version, now)
        self._index(owner, path, data, node[3] if node else None)
        return abi.FsStat(path, "file", len(data), version, now, digest)

    def _retain(self, owner: str, path: str, head: int, now: float) -> None:
        """Drop versions past the retention (never the head)."""
        c = self.config
        rows = self.db.read(
            "SELECT version, blob, size FROM fs_versions WHERE owner=? AND path=? AND "
            "version != ? AND (version <= ? OR (? > 0 AND created_at < ?))",
            (owner, path, head, head - c.fs_versions_kept, c.fs_versions_max_age_s,
             now - c.fs_versions_max_age_s))
        for version, digest, size in rows:
            self.db.write("DELETE FROM fs_versions WHERE owner=? AND path=? AND version=?",
                            (owner, path, version))
            self._used[owner] = self.used(owner) - size
            self._forget_blob(digest)

    def _forget_blob(self, digest: str) -> None:
        if not self._garbage:
            self.calls.after(0.05, self._collect)
        self._garbage.add(digest)

    def _collect(self) -> None:
        """Delete blobs whose last reference is gone, once that is committed."""
        if self.db.conn.in_transaction:  # this step's writes are not durable yet
            self.calls.after(0.05, self._collect)
            return
        garbage, self._garbage = self._garbage, set()
        for digest in garbage:
            if not self.db.read("SELECT 1 FROM fs_versions WHERE blob=? LIMIT 1", (digest,)):
                self.blobs.delete(digest)

    def _index(self, owner: str, path: str, data: bytes, memory_id: int | None) -> None:
        """Keep the file's text in the kernel's memory namespace for fs.search."""
        memory = self.memory
        namespace = f".fs/{owner}"
        try:
            text = data[:INDEX_CHARS * 4].decode("utf-8")[:INDEX_CHARS]
        except UnicodeDecodeError:
            text = ""
        if memory_id is not None:
            memory.delete(namespace, memory_id)
        new_id = None
        if text.strip():
            new_id = memory.add(None, namespace, f"{path}\n{text}", {"path": path})
        self.db.write("UPDATE fs_files SET memory_id=? WHERE owner=? AND path=?",
                        (new_id, owner, path))

    # --- operations ----------------------------------------------------------------------------

    def write(self, owner: str, path: str, data: bytes) -> abi.FsStat:
        return self._commit_version(owner, path, data, "write")

    def append(self, owner: str, path: str, data: bytes) -> abi.FsStat:
        node = self._node(owner, path)
        old = b""
        if node is not None and node[0] == "file":
            old = self._read_blob(self._version(owner, path, node[1])[0])
        return self._commit_version(owner, path, old + data, "append")

    def read(self, owner: str, path: str, version: int | None) -> bytes:
        head, _ = self._file(owner, path)
        return self._read_blob(self._version(owner, path, version or head)[0])

    def stat(self, owner: str, path: str) -> abi.FsStat:
        if path == "":
            return abi.FsStat("", "dir")
        node = self._node(owner, path)
        if node is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no such file or directory: {path}")
        kind, head, created, _ = node
        if kind == "dir":
            return abi.FsStat(path, "dir", modified_at=created)
        digest, size, modified, _ = self._version(owner, path, head)
        return abi.FsStat(path, "file", size, head, modified, digest)

    def list(self, owner: str, path: str) -> list[abi.FsStat]:
        if path and self.stat(owner, path).kind != "dir":
            raise Fault(abi.ErrorCode.EINVAL, f"{path} is not a directory")
        prefix = f"{path}/" if path else ""
        # Children only: under the prefix, with no further '/'.
        rows = self.db.read(
            "SELECT f.path, f.kind, COALESCE(v.size, 0), f.head, "
            "COALESCE(v.created_at, f.created_at), v.blob FROM fs_files f "
            "LEFT JOIN fs_versions v ON v.owner=f.owner AND v.path=f.path AND v.version=f.head "
            "WHERE f.owner=? AND substr(f.path, 1, ?)=? AND length(f.path) > ? AND "
            "instr(substr(f.path, ? + 1), '/') = 0 ORDER BY f.path",
            (owner, len(prefix), prefix, len(prefix), len(prefix)))
        return [abi.FsStat(p, kind, size, head, modified, digest)
                for p, kind, size, head, modified, digest in rows]

    def mkdir(self, owner: str, path: str) -> abi.FsStat:
        now = time.time()
        node = self._node(owner, path)
        if node is not None:
            if node[0] == "dir":
                return abi.FsStat(path, "dir", modified_at=node[2])
            raise Fault(abi.ErrorCode.EINVAL, f"{path} is a file")
        self._mkparents(owner, path, now)
        self.db.write("INSERT INTO fs_files (owner, path, kind, created_at) VALUES (?,?,?,?)",
                        (owner, path, "dir", now))
        return abi.FsStat(path, "dir", modified_at=now)

    def delete(self, call: Call, owner: str, path: str) -> Any:
        """Remove a file and all its versions, or an empty directory. Irreversible: it may
        wait for a human's approval, and is checked again when it runs."""
        self._deletable(owner, path)
        return self.approvals.irreversible(call, "delete", f"fs/{owner}/{path}",
                                             lambda: self._delete(owner, path))

    def _deletable(self, owner: str, path: str) -> tuple[Any, ...]:
        node = self._node(owner, path)
        if node is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no such file or directory: {path}")
        if node[0] == "dir" and self.list(owner, path):
            raise Fault(abi.ErrorCode.EBUSY, f"directory {path} is not empty")
        return node

    def _delete(self, owner: str, path: str) -> None:
        node = self._deletable(owner, path)
        for digest, size in self.db.read("SELECT blob, size FROM fs_versions WHERE owner=? "
                                           "AND path=?", (owner, path)):
            self._used[owner] = self.used(owner) - size
            self._forget_blob(digest)
        self.db.write("DELETE FROM fs_versions WHERE owner=? AND path=?", (owner, path))
        self.db.write("DELETE FROM fs_files WHERE owner=? AND path=?", (owner, path))
        if node[3] is not None:
            self.memory.delete(f".fs/{owner}", node[3])

    def versions(self, owner: str, path: str) -> list[abi.FsVersion]:
        self._file(owner, path)
        rows = self.db.read("SELECT version, size, blob, created_at, op FROM fs_versions "
                              "WHERE owner=? AND path=? ORDER BY version", (owner, path))
        return [abi.FsVersion(v, size, digest, created, op)
                for v, size, digest, created, op in rows]

    def rollback(self, owner: str, path: str, version: int | None,
                 at: float | None) -> abi.FsStat:
        """Make an old version current again, as a new version (history is kept)."""
        if (version is None) == (at is None):
            raise Fault(abi.ErrorCode.EINVAL, "give exactly one of version and time")
        self._file(owner, path)
        if version is None:
            rows = self.db.read("SELECT version FROM fs_versions WHERE owner=? AND path=? AND "
                                  "created_at <= ? ORDER BY version DESC LIMIT 1",
                                  (owner, path, at))
            if not rows:
                raise Fault(abi.ErrorCode.ENOENT, f"{path} has no kept version from before {at}")
            version = rows[0][0]
        digest = self._version(owner, path, version)[0]
        return self._commit_version(owner, path, self._read_blob(digest), "rollback")

    def share(self, call: Call, owner: str, path: str, to: str, rights: list[str],
              expires_in_s: float | None) -> str:
        """Mint a capability for agent `to` on `path` (and everything under it), narrowed to
        `rights`, derived from the caller's own token; the caller must hold every right it
        passes on. Returns the token, for the caller to hand over (e.g. by ipc.send)."""
        if path:
            self.stat(owner, path)  # ENOENT for a path that does not exist
        bad = sorted(set(rights) - set(SHAREABLE))
        if bad:
            raise Fault(abi.ErrorCode.EINVAL, f"cannot share {', '.join(bad)}; shareable: "
                         + ", ".join(SHAREABLE))
        receiver = self.procs.live_by_name(to)
        if receiver is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no running agent named {to!r}")
        resource = paths.resource(owner, path)
        rules = [Rule(op, resource) for op in sorted(set(rights))]
        self.access.check_grant(call.capability, rules)
        # A delegation by the access manager: a child of the caller's token that keeps its
        # caveats (expiry, budgets) and dies with it when it is revoked.
        grant = self.access.delegate(call, abi.DelegateArgs(
            to=f"agent:{receiver.agent_id}", caps=[str(r) for r in rules], ttl_s=expires_in_s))
        self.audit.append(call.caller.principal, "share", to=grant.audience,
                            token=grant.id, rules=[str(r) for r in rules])
        return grant.token

    def search(self, call: Call, owner: str, query: str, k: int) -> Any:
        return self.memory.search(call, f".fs/{owner}", query, k, {}, "auto", self._hits)

    @staticmethod
    def _hits(hits: list[abi.MemoryHit]) -> list[abi.FsHit]:
        return [abi.FsHit(h.metadata["path"], h.score,
                          h.content.partition("\n")[2][:SNIPPET_CHARS]) for h in hits]
