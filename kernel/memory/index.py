"""A namespace's vector index: exact inner-product search over a contiguous float32 matrix.

Chosen by measurement (README, tools/bench/memory.py): exact search has recall 1.0 by
construction and costs one BLAS matrix-vector product; HNSW (hnswlib) answers faster at 100k
but costs ~0.8 ms of single-core build time per insert, must be rebuilt or persisted beside
SQLite, and its recall depends on the data.
"""

from __future__ import annotations

import numpy as np


class VectorIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._row: dict[int, int] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, memory_id: int) -> bool:
        return memory_id in self._row

    @property
    def nbytes(self) -> int:
        return self.count * (self.dim * 4 + 8)

    def _grow(self, need: int) -> None:
        capacity = max(64, len(self._ids))
        while capacity < need:
            capacity *= 2
        if capacity != len(self._ids):
            vectors = np.zeros((capacity, self.dim), dtype=np.float32)
            vectors[: self.count] = self._vectors[: self.count]
            ids = np.zeros(capacity, dtype=np.int64)
            ids[: self.count] = self._ids[: self.count]
            self._vectors, self._ids = vectors, ids

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        """Insert or replace vectors (rows of `vectors`, unit length) for `ids`."""
        fresh = [(i, row) for row, i in enumerate(ids) if i not in self._row]
        for row, memory_id in enumerate(ids):
            at = self._row.get(memory_id)
            if at is not None:
                self._vectors[at] = vectors[row]
        if fresh:
            self._grow(self.count + len(fresh))
            for memory_id, row in fresh:
                self._vectors[self.count] = vectors[row]
                self._ids[self.count] = memory_id
                self._row[memory_id] = self.count
                self.count += 1

    def remove(self, memory_id: int) -> None:
        at = self._row.pop(memory_id, None)
        if at is None:
            return
        last = self.count - 1
        if at != last:  # keep rows dense: move the last row into the hole
            moved = int(self._ids[last])
            self._vectors[at] = self._vectors[last]
            self._ids[at] = moved
            self._row[moved] = at
        self.count = last

    def search(self, query: np.ndarray, k: int,
               allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """The `k` ids with the highest inner product with `query`, best first; only ids in
        `allowed` when it is given."""
        if self.count == 0 or k <= 0:
            return []
        scores = self._vectors[: self.count] @ query.astype(np.float32, copy=False)
        ids = self._ids[: self.count]
        if allowed is not None:
            mask = np.isin(ids, np.fromiter(allowed, dtype=np.int64, count=len(allowed)))
            scores = np.where(mask, scores, -np.inf)
            k = min(k, int(mask.sum()))
            if k == 0:
                return []
        k = min(k, self.count)
        top = np.argpartition(-scores, k - 1)[:k] if k < self.count else np.arange(self.count)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), float(scores[i])) for i in top]
