"""Memory search off the dispatch loop: one thread owns every namespace's vector index, loads
it from SQLite on a connection of its own, applies the loop's changes in the order the loop made
them, scans vectors and ranks keywords (FTS5), and answers through `Calls.post`; the loop only
reads the hits' rows.

Consistency rule. The loop sends every change of a memory's vector (`put`, `remove`) and every
search through one FIFO queue, and this thread alone touches the indexes, so a search sees the
index exactly as the loop's changes made it up to the moment the search was sent: never a torn
row, and every change the loop made before (in particular every acknowledged `memory.add`,
whose vector is put before its reply) is visible. The first use of a namespace loads it from
the database, which this connection sees only as committed; changes the loop made before that
may be uncommitted, so changes to namespaces not loaded yet are kept (tagged with the commit
count `Database.commits` at the time) until they are known to be committed, and the load
replays those it cannot be sure its snapshot holds. Replaying is safe because every change is
absolute (a vector, or none) and the replayed ones are a suffix of the namespace's history.
Filters are evaluated here against committed metadata; the loop re-checks each hit against its
own view (live, in the namespace, still matching) before answering, so a search that races a
delete or an update never returns a memory that is gone or no longer matches.

A load reads in chunks on a second connection (one snapshot) and serves the queue between
chunks, so other namespaces' searches do not wait behind it; the loading namespace's work, and
searches that would start another load, wait in a backlog, in order. Work taken early is only
ever another namespace's, so each namespace still sees its changes and searches in order.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernel.memory.embed import DIM, one_torch_thread, words
from kernel.memory.index import SHORTLIST, VectorIndex

log = logging.getLogger("kernel.memory")

LOAD_CHUNK = 8192  # rows read from SQLite per index.add while loading
FILTER_ROUNDS_UNTIL = 8  # check a filter on shortlists while they are under 1/8 of the rows


def filter_sql(filter: dict[str, Any]) -> tuple[str, list[Any]]:
    """`AND …` clauses (and their parameters) for a metadata filter: key == value, all hold."""
    clauses, params = [], []
    for key, value in filter.items():  # keys are [A-Za-z0-9_] (checked by the ABI)
        if value is None:
            clauses.append(f"json_type(metadata, '$.{key}') = 'null'")
        else:
            clauses.append(f"json_extract(metadata, '$.{key}') = ?")
            params.append(int(value) if isinstance(value, bool) else value)
    return "".join(f" AND {c}" for c in clauses), params


@dataclass
class Found:
    """A search's answer, each (id, score) best first: by vector, and by words (a keyword
    search, or the top-up of a vector search that found too few)."""

    hits: list[tuple[int, float]]
    words: list[tuple[int, float]]


def keyword_terms(query: str) -> str | None:
    """An FTS5 query matching any of the query's words (None: it has none)."""
    terms = sorted(set(words(query)))[:64]
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms) if terms else None


Change = tuple[int, int, np.ndarray | None]  # (commit count when made, memory id, vector)


class Stopping(Exception):
    """The kernel is stopping: a load in progress gives up (its call is cancelled anyway)."""


class IndexThread:
    def __init__(self, db_path: Path, embedder: str | None, commits: Callable[[], int],
                 post: Callable[[Callable[[], None]], None]) -> None:
        self._path = db_path
        self._embedder = embedder
        self._commits = commits
        self._post = post
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._backlog: deque[tuple[Any, ...] | None] = deque()  # set aside during a load
        self._stopping = False
        self._one_thread = False  # torch set to one thread here yet
        self._db: sqlite3.Connection  # for searches: opened by the thread
        self._load_db: sqlite3.Connection  # for loads (a snapshot each)
        self._indexes: dict[str, VectorIndex] = {}
        self._pending: dict[str, list[Change]] = {}  # changes to namespaces not loaded yet
        self._pending_count = 0
        self._sweep_at = 1024
        self._thread = threading.Thread(target=self._run, name="memory-index", daemon=True)
        self.loads = 0
        self.load_seconds = 0.0  # of the last load
        self.searches = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, float]:
        return {"namespaces_indexed": len(self._indexes), "index_loads": self.loads,
                "index_load_ms": round(self.load_seconds * 1000, 1),
                "vector_searches": self.searches}

    # --- called on the loop thread ------------------------------------------------------------

    def put(self, namespace: str, memory_id: int, vector: np.ndarray) -> None:
        self._queue.put(("change", namespace, (self._commits(), memory_id, vector)))

    def remove(self, namespace: str, memory_id: int) -> None:
        self._queue.put(("change", namespace, (self._commits(), memory_id, None)))

    def search(self, namespace: str, vector: np.ndarray | None, query: str, k: int,
               filter: dict[str, Any], auto: bool, done: Callable[[Found | None], None]) -> None:
        """Find the `k` best by `vector`, or by the words of `query` when it is None (`auto`:
        also by words if the vectors found fewer than k, and some memories have none); `done`
        runs on the loop thread with the answer (None: failed)."""
        self._queue.put(("search", namespace, vector, query, k, filter, auto, done))

    # --- the thread ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA query_only=ON")
        return db

    def _run(self) -> None:
        # Searches read the latest commit; a load holds one snapshot open for its duration.
        self._db, self._load_db = self._connect(), self._connect()
        try:
            while (op := self._backlog.popleft() if self._backlog else self._queue.get()):
                self._do(op)
        finally:
            self._db.close()
            self._load_db.close()

    def _do(self, op: tuple[Any, ...]) -> None:
        if op[0] == "change":
            try:
                self._change(op[1], op[2])
            except Exception:  # the thread must outlive a bad change: searches wait on it
                log.exception("memory index change failed", extra={"namespace": op[1]})
            return
        _, namespace, vector, query, k, filter, auto, done = op
        try:
            found: Found | None = self._search(namespace, vector, query, k, filter, auto)
        except Stopping:
            return
        except Exception:
            log.exception("vector search failed", extra={"namespace": namespace})
            found = None
        self._post(lambda: done(found))

    def _serve_others(self, loading: str) -> None:
        """Between a load's chunks: do what is queued for other loaded namespaces now."""
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            if op is None or op[1] == loading or (op[0] == "search" and op[2] is not None
                                                  and op[1] not in self._indexes):
                self._backlog.append(op)
                if op is None:
                    self._stopping = True
                    return
            else:
                self._do(op)

    def _change(self, namespace: str, change: Change) -> None:
        index = self._indexes.get(namespace)
        if index is not None:
            self._apply(index, change)
            return
        self._pending.setdefault(namespace, []).append(change)
        self._pending_count += 1
        if self._pending_count >= self._sweep_at:
            self._sweep()

    def _sweep(self) -> None:
        """Forget pending changes that are committed: a later load reads them from SQLite."""
        committed = self._commits()
        for namespace in list(self._pending):
            kept = [c for c in self._pending[namespace] if c[0] >= committed]
            if kept:
                self._pending[namespace] = kept
            else:
                del self._pending[namespace]
        self._pending_count = sum(map(len, self._pending.values()))
        self._sweep_at = max(1024, 2 * self._pending_count)

    @staticmethod
    def _apply(index: VectorIndex, change: Change) -> None:
        _, memory_id, vector = change
        if vector is None:
            index.remove(memory_id)
        else:
            index.add([memory_id], vector[None, :])

    def _load(self, namespace: str) -> VectorIndex:
        started = time.perf_counter()
        committed = self._commits()  # the snapshot below holds at least this many commits
        index = VectorIndex(DIM)
        cursor = self._load_db.execute("SELECT id, embedding FROM memories WHERE namespace=? AND "
                            "embedder=? AND length(embedding)=?",
                            (namespace, self._embedder, DIM * 4))
        while rows := cursor.fetchmany(LOAD_CHUNK):
            index.add([r[0] for r in rows], np.frombuffer(b"".join(r[1] for r in rows),
                                                          np.float32).reshape(len(rows), DIM))
            self._serve_others(namespace)
            if self._stopping:
                raise Stopping
        pending = self._pending.pop(namespace, [])
        self._pending_count -= len(pending)
        for change in pending:
            if change[0] >= committed:  # maybe not in the snapshot: replay it
                self._apply(index, change)
        self._indexes[namespace] = index
        self.loads += 1
        self.load_seconds = time.perf_counter() - started
        log.info("memory index loaded", extra={"namespace": namespace, "vectors": len(index),
                                               "seconds": round(self.load_seconds, 3)})
        return index

    def _allowed(self, namespace: str, index: VectorIndex, vector: np.ndarray, k: int,
                 where: str, params: list[Any]) -> set[int]:
        """Ids the filter allows, enough to find the best `k` of them: checked on a growing
        shortlist of the best rows (point reads), since a pass over a large namespace's
        metadata costs far more (124 ms at 100k). A shortlist holding SHORTLIST * k allowed
        rows (at least 64) has the best k allowed ones, as in `VectorIndex.search`; a filter
        too selective for that reads the namespace's whole allowed set."""
        need = max(64, SHORTLIST * k)
        want = 4 * need
        while want * FILTER_ROUNDS_UNTIL <= len(index):
            ids = index.ranked(vector, want)
            allowed: set[int] = set()
            for start in range(0, len(ids), 4096):
                part = ids[start:start + 4096]
                allowed.update(r[0] for r in self._db.execute(
                    f"SELECT id FROM memories WHERE namespace=? AND id IN "
                    f"({','.join('?' * len(part))}) {where}", (namespace, *part, *params)))
            if len(allowed) >= need:
                return allowed
            want *= 8
        return {r[0] for r in self._db.execute(
            f"SELECT id FROM memories WHERE namespace=? {where}", (namespace, *params))}

    def _search(self, namespace: str, vector: np.ndarray | None, query: str, k: int,
                filter: dict[str, Any], auto: bool) -> Found:
        where, params = filter_sql(filter)
        found = Found([], [])
        if vector is not None:
            index = self._indexes.get(namespace)
            if index is None:
                index = self._load(namespace)
            if index.quantized and not self._one_thread:
                one_torch_thread()
                self._one_thread = True
            allowed = self._allowed(namespace, index, vector, k, where, params) if filter \
                else None
            found.hits = index.search(vector, k, allowed)
            self.searches += 1
            if not auto or len(found.hits) >= k or not self._db.execute(
                    "SELECT 1 FROM memories WHERE namespace=? AND (embedder IS NULL OR "
                    "embedder != ?) LIMIT 1", (namespace, self._embedder)).fetchone():
                return found
        # Memories not embedded yet (or by another model) are still found by their words.
        match = keyword_terms(query)
        if match is not None:
            rows = self._db.execute(
                "SELECT m.id, bm25(memories_fts) FROM memories_fts JOIN memories m ON m.id = "
                f"memories_fts.rowid WHERE memories_fts MATCH ? AND m.namespace=? {where} "
                "ORDER BY bm25(memories_fts) LIMIT ?", (match, namespace, *params, k))
            found.words = [(i, -rank) for i, rank in rows]  # bm25: lower is better
        return found
