"""The memory manager: per-namespace memories, durable in SQLite, cached in a RAM tier evicted
with LRU-K, searched by embedding (a vector index per namespace, on its own thread) with a
keyword (FTS5) fallback.

Every memory is written through to SQLite (the disk tier) in the caller's batch transaction, so
evicting from RAM costs no write and a later access reloads the row transparently. Vectors of
every memory stay resident in their namespace's index (search must see all of them); content
and metadata are what the RAM tier holds and evicts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kernel.call import Call, Calls, Fault
from kernel.memory.embed import Embedder, HashEmbedder, MiniLMEmbedder
from kernel.memory.indexes import Found, IndexThread, filter_sql
from kernel.memory.lruk import LRUK
from kernel.memory.worker import EmbedWorker
from sdk import abi, models

if TYPE_CHECKING:
    from kernel.config import Config
    from kernel.db import Database
    from kernel.state import StateDir

log = logging.getLogger("kernel.memory")

ITEM_OVERHEAD = 64  # bytes charged per memory besides its content and metadata


@dataclass
class Item:
    """A memory resident in the RAM tier."""

    namespace: str
    content: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float


def owner_key(namespace: str) -> str:
    """Whose quota and RAM tier a namespace counts against: its first two segments, so
    `agent/bob/notes` is bob's (`agent/bob`) and sub-namespaces cannot multiply a quota."""
    return "/".join(namespace.split("/")[:2])


def make_embedder(name: str) -> Embedder | None:
    if name == "hash":
        return HashEmbedder()
    if name == "hash-slow":  # the hashing embedder on the worker thread (tests of that path)
        return HashEmbedder(slow=True)
    if name in ("minilm", "auto"):
        path = models.installed_embedder()
        if path is not None:
            # No thread count: torch's is process-wide and the LLM engine's to set.
            return MiniLMEmbedder(path)
        if name == "minilm":
            raise ValueError(f"memory_embedder=minilm but {models.EMBEDDER} is not pulled "
                             "(agentos mem pull)")
        log.warning("no embedding model pulled; memory search uses keywords only "
                    "(agentos mem pull)")
        return None
    if name == "none":
        return None
    raise ValueError(f"unknown memory_embedder {name!r}: auto | minilm | hash | none")


class MemoryManager:
    def __init__(self, *, calls: Calls, config: Config, db: Database, state: StateDir,
                 embedder: Embedder | None = None) -> None:
        self.calls = calls
        self.config = config
        self.db = db
        self.state = state
        c = config
        self.embedder = embedder if embedder is not None else make_embedder(c.memory_embedder)
        self.worker = (EmbedWorker(self.embedder, calls.post, after=calls.after,
                                   backoff=c.restart_backoff, backoff_max=c.restart_backoff_max,
                                   on_restart=self._backfill)
                       if self.embedder is not None and self.embedder.slow else None)
        self.indexes = IndexThread(state.db_path, getattr(self.embedder, "name", None),
                                   lambda: db.commits, calls.post)
        self.resident: dict[int, Item] = {}
        self.tiers: dict[str, LRUK] = {}
        self.ram_bytes = 0
        self._stored: dict[str, int] = {}
        self.counters = {"evictions": 0, "reloads": 0, "embedded": 0}

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()
        self.indexes.start()
        self._backfill()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.indexes.stop()

    def stats(self) -> dict[str, float]:
        return {"resident": len(self.resident), "ram_bytes": self.ram_bytes,
                **self.indexes.stats(), **self.counters}

    def dependency(self) -> abi.DependencyInfo | None:
        """The embedder's state for `sys.stats` (None: no embedder)."""
        if self.embedder is None:
            return None
        if self.worker is None:  # runs on the loop: up whenever the kernel is
            return abi.DependencyInfo("embedder", self.embedder.name, "ready")
        state, restarts, error = self.worker.info()
        return abi.DependencyInfo("embedder", self.embedder.name, state, restarts, error)

    # --- embeddings ---------------------------------------------------------------------------

    def _embed(self, texts: list[str], done: Callable[[np.ndarray | None], None]) -> bool:
        """Embed `texts` and call `done` with the rows (None: no embedder, or it failed).
        Returns True if `done` already ran (fast embedder or none); else it runs later on the
        loop thread."""
        if self.embedder is None or (self.worker is not None and self.worker.failed):
            done(None)
            return True
        if self.worker is None:
            done(self.embedder.embed(texts))
            return True
        self.worker.submit(texts, done)
        return False

    def _answer(self, call: Call | None, texts: list[str],
                then: Callable[[np.ndarray | None], Any]) -> Any:
        """Run `then(vectors)` once the texts are embedded and answer `call` with its result,
        now or (parked) when the worker is done."""
        box: list[Any] = []

        def done(vectors: np.ndarray | None) -> None:
            if call is None:
                then(vectors)
                return
            if box == ["parked"]:
                # Run `then` even if the caller gave up: an added memory still gets its vector.
                try:
                    self.calls.reply(call, then(vectors))
                except Fault as exc:
                    self.calls.fail(call, exc.code, exc.message)
                except Exception:
                    log.exception("memory call failed", extra={"call": call.name})
                    self.calls.fail(call, abi.ErrorCode.EIO, "internal kernel error (logged)")
            else:
                box.append(then(vectors))

        if self._embed(texts, done):
            return box[0] if box else None
        box.append("parked")
        if call is None:
            return None
        self.calls.offload(call)
        return self.calls.park(call, call.timeout_ms)

    def embed(self, call: Call, texts: list[str]) -> Any:
        """`memory.embed`: the embedder's vectors for `texts` (the call parks on the worker)."""
        embedder = self.embedder

        def then(vectors: np.ndarray | None) -> abi.EmbedResult:
            if embedder is None:
                raise Fault(abi.ErrorCode.ENOSYS, "this kernel has no embedding model "
                             "(agentos mem pull, or memory_embedder in the config)")
            if vectors is None:
                raise Fault(abi.ErrorCode.EIO, self._embedder_down())
            return abi.EmbedResult(embedder.name, vectors.tolist(),
                                   sum(len(t.split()) for t in texts))

        return self._answer(call, texts, then)

    def _embedder_down(self) -> str:
        worker = self.worker
        if worker is None or not worker.failed:
            return "the embedder failed during the call; retry"
        return (f"the embedder is {worker.state} after it failed ({worker.error}); retry "
                "shortly")

    def _store_vector(self, namespace: str, memory_id: int, vector: np.ndarray) -> None:
        if not self._exists(namespace, memory_id):
            return  # deleted while it was being embedded
        vector = vector.astype(np.float32)
        self.db.write("UPDATE memories SET embedding=?, embedder=? WHERE id=?",
                        (vector.tobytes(), self.embedder.name, memory_id))
        self.indexes.put(namespace, memory_id, vector)
        self.counters["embedded"] += 1

    def _backfill(self) -> None:
        """Memories a crash (or a missing model) left without a vector, or with another
        embedder's, get one now, in batches."""
        if self.embedder is None:
            return
        rows = self.db.read("SELECT id, namespace, content FROM memories "
                              "WHERE embedder IS NULL OR embedder != ?", (self.embedder.name,))
        for start in range(0, len(rows), 256):
            batch = rows[start:start + 256]

            def done(vectors: np.ndarray | None, batch: list[Any] = batch) -> None:
                if vectors is not None:
                    for (memory_id, namespace, _), vector in zip(batch, vectors, strict=True):
                        self._store_vector(namespace, memory_id, vector)

            self._embed([content for _, _, content in batch], done)

    # --- the RAM tier -------------------------------------------------------------------------

    def _tier(self, namespace: str) -> LRUK:
        key = owner_key(namespace)
        tier = self.tiers.get(key)
        if tier is None:
            tier = self.tiers[key] = LRUK(self.config.memory_lru_k)
        return tier

    def _admit(self, memory_id: int, item: Item, size: int) -> None:
        tier = self._tier(item.namespace)
        old = tier.size_of(memory_id) if memory_id in tier else 0
        self.resident[memory_id] = item
        tier.access(memory_id, size)
        self.ram_bytes += size - old
        self._balance(item.namespace, keep=memory_id)

    def _drop(self, namespace: str, memory_id: int) -> None:
        tier = self.tiers.get(owner_key(namespace))
        if tier is not None and memory_id in tier:
            self.ram_bytes -= tier.remove(memory_id)
        self.resident.pop(memory_id, None)

    def _balance(self, namespace: str, keep: int) -> None:
        """Past the threshold of the namespace's quota or the kernel-wide budget, evict LRU-K
        victims (the namespace's own first, then the globally oldest) back to the disk tier."""
        c = self.config
        tier = self._tier(namespace)
        while tier.bytes > c.memory_ram_quota * c.memory_evict_threshold:
            if not self._evict_from(tier, keep):
                break
        while self.ram_bytes > c.memory_ram_budget * c.memory_evict_threshold:
            heads = [(head[:2], t) for t in self.tiers.values()
                     if (head := t.peek_victim(keep)) is not None]
            if not heads:
                break
            self._evict_from(min(heads, key=lambda h: h[0])[1], keep)

    def _evict_from(self, tier: LRUK, keep: int) -> bool:
        victim = tier.evict(keep)
        if victim is None:
            return False
        memory_id, size = victim
        self.resident.pop(memory_id, None)
        self.ram_bytes -= size
        self.counters["evictions"] += 1
        if tier.remembered > 4 * len(tier) + 1024:
            tier.forget_history(len(tier) + 1024)
        return True

    def _load(self, namespace: str, memory_id: int) -> Item | None:
        """A memory through the RAM tier: resident, or reloaded from disk and admitted."""
        item = self.resident.get(memory_id)
        if item is not None and item.namespace == namespace:
            self._tier(namespace).access(memory_id)
            return item
        rows = self.db.read("SELECT content, metadata, created_at, updated_at, size "
                              "FROM memories WHERE id=? AND namespace=?", (memory_id, namespace))
        if not rows:
            return None
        content, metadata, created, updated, size = rows[0]
        item = Item(namespace, content, json.loads(metadata), created, updated)
        self.counters["reloads"] += 1
        self._admit(memory_id, item, size)
        return item

    # --- quotas -------------------------------------------------------------------------------

    def forget_usage(self) -> None:
        """Sum the namespaces' usage again from the database (a batch was rolled back)."""
        self._stored.clear()

    def stored(self, namespace: str) -> int:
        """Bytes stored under the namespace's owner (see `owner_key`)."""
        key = owner_key(namespace)
        if key not in self._stored:
            rows = self.db.read("SELECT COALESCE(SUM(size), 0) FROM memories WHERE "
                                  "namespace=? OR substr(namespace, 1, ?)=?",
                                  (key, len(key) + 1, key + "/"))
            self._stored[key] = rows[0][0]
        return self._stored[key]

    def _charge(self, namespace: str, delta: int) -> None:
        key = owner_key(namespace)
        quota = self.config.memory_quota
        # The kernel's own namespaces (.fs/…, the fs search index) are covered by the fs quota.
        if delta > 0 and not namespace.startswith(".") and self.stored(key) + delta > quota:
            raise Fault(abi.ErrorCode.EQUOTA, f"{key!r} would hold {self.stored(key) + delta} "
                         f"bytes, over its {quota}-byte quota")
        self._stored[key] = self.stored(key) + delta

    def _size(self, content: str, metadata: dict[str, Any]) -> tuple[int, str]:
        try:
            meta = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise Fault(abi.ErrorCode.EINVAL, f"metadata must be JSON: {exc}") from None
        size = len(content.encode()) + len(meta.encode()) + ITEM_OVERHEAD
        if size > self.config.memory_item_bytes:
            raise Fault(abi.ErrorCode.EINVAL, f"memory is {size} bytes, over the "
                         f"{self.config.memory_item_bytes}-byte limit")
        return size, meta

    # --- operations ---------------------------------------------------------------------------

    def _exists(self, namespace: str, memory_id: int) -> bool:
        return bool(self.db.read("SELECT 1 FROM memories WHERE id=? AND namespace=?",
                                   (memory_id, namespace)))

    def add(self, call: Call | None, namespace: str, content: str,
            metadata: dict[str, Any]) -> Any:
        size, meta = self._size(content, metadata)
        self._charge(namespace, size)
        now = time.time()
        cur = self.db.write("INSERT INTO memories (namespace, content, metadata, size, "
                              "created_at, updated_at) VALUES (?,?,?,?,?,?)",
                              (namespace, content, meta, size, now, now))
        memory_id = int(cur.lastrowid)
        self.db.write("INSERT INTO memories_fts (rowid, content) VALUES (?,?)",
                        (memory_id, content))
        self._admit(memory_id, Item(namespace, content, json.loads(meta), now, now), size)

        def then(vectors: np.ndarray | None) -> int:
            if vectors is not None:
                self._store_vector(namespace, memory_id, vectors[0])
            return memory_id

        result = self._answer(call, [content], then)
        return memory_id if call is None else result

    def get(self, namespace: str, memory_id: int) -> abi.Memory:
        item = self._load(namespace, memory_id)
        if item is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no memory {memory_id} in {namespace!r}")
        return abi.Memory(memory_id, namespace, item.content, item.metadata, item.created_at,
                          item.updated_at)

    def update(self, call: Call | None, namespace: str, memory_id: int, content: str | None,
               metadata: dict[str, Any] | None) -> Any:
        item = self._load(namespace, memory_id)
        if item is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no memory {memory_id} in {namespace!r}")
        new_content = item.content if content is None else content
        new_meta = item.metadata if metadata is None else metadata
        size, meta = self._size(new_content, new_meta)
        old = self.db.read("SELECT size FROM memories WHERE id=?", (memory_id,))[0][0]
        self._charge(namespace, size - old)
        now = time.time()
        self.db.write("UPDATE memories SET content=?, metadata=?, size=?, updated_at=? "
                        "WHERE id=?", (new_content, meta, size, now, memory_id))
        if new_content != item.content:
            self._unindex_words(memory_id, item.content)
            self.db.write("INSERT INTO memories_fts (rowid, content) VALUES (?,?)",
                            (memory_id, new_content))
        self._admit(memory_id, Item(namespace, new_content, json.loads(meta), item.created_at,
                                    now), size)
        if content is None or content == item.content:
            return None

        def then(vectors: np.ndarray | None) -> None:
            if vectors is not None:
                self._store_vector(namespace, memory_id, vectors[0])
            else:  # the old vector no longer describes the content
                self.db.write("UPDATE memories SET embedding=NULL, embedder=NULL WHERE id=?",
                                (memory_id,))
                self.indexes.remove(namespace, memory_id)

        return self._answer(call, [new_content], then)

    def delete(self, namespace: str, memory_id: int) -> None:
        rows = self.db.read("SELECT size, content FROM memories WHERE id=? AND namespace=?",
                              (memory_id, namespace))
        if not rows:
            raise Fault(abi.ErrorCode.ENOENT, f"no memory {memory_id} in {namespace!r}")
        self._unindex_words(memory_id, rows[0][1])
        self.db.write("DELETE FROM memories WHERE id=?", (memory_id,))
        self._charge(namespace, -rows[0][0])
        self._drop(namespace, memory_id)
        self.indexes.remove(namespace, memory_id)

    def _unindex_words(self, memory_id: int, content: str) -> None:
        # An external-content FTS5 table forgets a row only when told its old text.
        self.db.write("INSERT INTO memories_fts (memories_fts, rowid, content) "
                        "VALUES ('delete', ?, ?)", (memory_id, content))

    def list(self, namespace: str, after: int, limit: int,
             filter: dict[str, Any]) -> list[abi.Memory]:
        # A scan reads the disk tier directly: listing must not flush the RAM tier.
        where, params = filter_sql(filter)
        rows = self.db.read(
            "SELECT id, content, metadata, created_at, updated_at FROM memories "
            f"WHERE namespace=? AND id>? {where} ORDER BY id LIMIT ?",
            (namespace, after, *params, limit))
        return [abi.Memory(i, namespace, c, json.loads(m), cr, up) for i, c, m, cr, up in rows]

    def search(self, call: Call, namespace: str, query: str, k: int, filter: dict[str, Any],
               mode: str = "auto",
               shape: Callable[[list[abi.MemoryHit]], Any] | None = None) -> Any:
        """The `k` best memories for `query`, passed through `shape` (the reply). The call
        parks: the query is embedded (on the embedder's thread if it is slow), the index thread
        scans the vectors or ranks the words, then the hits are read here and the call
        answered."""
        shape = shape or (lambda hits: hits)
        if mode == "vector" and self.worker is not None and self.worker.failed:
            raise Fault(abi.ErrorCode.EAGAIN, self._embedder_down() + "; or use mode=keyword")
        self.calls.offload(call)
        parked = self.calls.park(call, call.timeout_ms)

        def embedded(vectors: np.ndarray | None) -> None:
            # Twice k: hits deleted while the search ran are dropped, the next ones stand in.
            self.indexes.search(namespace, None if vectors is None else vectors[0], query,
                                2 * k, filter, mode == "auto",
                                lambda found: self._settle(call, lambda: shape(
                                    self._hits(namespace, k, filter, found))))

        def vector_only(vectors: np.ndarray | None) -> None:
            if vectors is None:  # the embedder failed during the call: no silent empty answer
                self._settle(call, lambda: self._raise(abi.ErrorCode.EIO, self._embedder_down()))
            else:
                embedded(vectors)

        if mode == "keyword" or self.embedder is None:
            embedded(None)
        else:
            self._embed([query], vector_only if mode == "vector" else embedded)
        return parked

    @staticmethod
    def _raise(code: abi.ErrorCode, message: str) -> Any:
        raise Fault(code, message)

    def _settle(self, call: Call, answer: Callable[[], Any]) -> None:
        """Answer a parked call with `answer()`, or with the error it raises."""
        if call.done:  # timed out or cancelled meanwhile
            return
        try:
            self.calls.reply(call, answer())
        except Fault as exc:
            self.calls.fail(call, exc.code, exc.message)
        except Exception:
            log.exception("memory call failed", extra={"call": call.name})
            self.calls.fail(call, abi.ErrorCode.EIO, "internal kernel error (logged)")

    def _hits(self, namespace: str, k: int, filter: dict[str, Any],
              found: Found | None) -> list[abi.MemoryHit]:
        """The index thread's answer, as memories that exist and match now: it read committed
        rows, and a delete or update may have happened since."""
        if found is None:
            raise Fault(abi.ErrorCode.EIO, "search failed (logged)")
        ranked = [(i, s, "vector") for i, s in found.hits] + [(i, s, "keyword")
                                                              for i, s in found.words]
        if filter and ranked:
            where, params = filter_sql(filter)
            ids = sorted({i for i, _, _ in ranked})
            matching = {r[0] for r in self.db.read(
                f"SELECT id FROM memories WHERE namespace=? AND id IN ({','.join('?' * len(ids))})"
                f" {where}", (namespace, *ids, *params))}
            ranked = [hit for hit in ranked if hit[0] in matching]
        hits: list[abi.MemoryHit] = []
        seen: set[int] = set()
        for memory_id, score, match in ranked:  # vector hits first, then words top them up
            if memory_id in seen:
                continue
            item = self._load(namespace, memory_id)  # None: deleted while the search ran
            if item is not None:
                seen.add(memory_id)
                hits.append(abi.MemoryHit(memory_id, namespace, item.content, item.metadata,
                                          round(score, 6), match))
                if len(hits) == k:
                    break
        return hits
