"""A namespace's vector index: exact inner-product search over a contiguous float32 matrix.

Chosen by measurement (README, tools/bench/memory.py): brute force has recall 1.0 by
construction and needs no build; HNSW (hnswlib, usearch) answers in well under a millisecond
but costs about a millisecond of single-core build time per insert, must be rebuilt or
persisted beside SQLite, and its recall depends on the data. Brute force is bound by memory
bandwidth, so large namespaces scan a float16 shadow copy (half the bytes; torch, which the
kernel has anyway, multiplies float16 quickly, numpy does not) for a shortlist that is then
re-scored exactly in float32.
"""

from __future__ import annotations

import numpy as np

HALF_FROM = 16384  # rows from which search scans the float16 copy first
SHORTLIST = 8  # the float16 scan keeps k * SHORTLIST candidates (at least 64) for re-scoring


def _to_half(rows: np.ndarray) -> np.ndarray:
    """float32 -> float16 through torch: numpy's conversion is ~20x slower (scalar code)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rows)).half().numpy()


class VectorIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._half: np.ndarray | None = None  # float16 copy of the rows, once count > HALF_FROM
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
            if self._half is not None:
                self._half = _to_half(self._vectors)

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        """Insert or replace vectors (rows of `vectors`, unit length) for `ids`."""
        fresh = [row for row, memory_id in enumerate(ids) if memory_id not in self._row]
        if len(fresh) < len(ids):
            for row, memory_id in enumerate(ids):
                at = self._row.get(memory_id)
                if at is not None:
                    self._set(at, vectors[row])
        if fresh:
            start = self.count
            self._grow(start + len(fresh))
            end = start + len(fresh)
            self._vectors[start:end] = vectors if len(fresh) == len(ids) else vectors[fresh]
            if self._half is not None:
                self._half[start:end] = _to_half(self._vectors[start:end])
            self._ids[start:end] = [ids[row] for row in fresh]
            self._row.update((ids[row], start + n) for n, row in enumerate(fresh))
            self.count = end
        if self._half is None and self.count >= HALF_FROM:
            self._half = _to_half(self._vectors)

    def _set(self, at: int, vector: np.ndarray) -> None:
        self._vectors[at] = vector
        if self._half is not None:
            self._half[at] = vector

    def remove(self, memory_id: int) -> None:
        at = self._row.pop(memory_id, None)
        if at is None:
            return
        last = self.count - 1
        if at != last:  # keep rows dense: move the last row into the hole
            moved = int(self._ids[last])
            self._set(at, self._vectors[last])
            self._ids[at] = moved
            self._row[moved] = at
        self.count = last

    def search(self, query: np.ndarray, k: int,
               allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """The `k` ids with the highest inner product with `query`, best first; only ids in
        `allowed` when it is given."""
        if self.count == 0 or k <= 0:
            return []
        query = query.astype(np.float32, copy=False)
        ids = self._ids[: self.count]
        mask = None
        if allowed is not None:
            mask = np.isin(ids, np.fromiter(allowed, dtype=np.int64, count=len(allowed)))
            k = min(k, int(mask.sum()))
            if k == 0:
                return []
        k = min(k, self.count)
        if self._half is not None and self.count >= HALF_FROM:
            rows = self._shortlist(query, max(64, k * SHORTLIST), mask)
            scores = self._vectors[rows] @ query  # exact, so float16 rounding cannot reorder
        else:
            scores = self._vectors[: self.count] @ query
            if mask is not None:
                scores = np.where(mask, scores, -np.inf)
            rows = np.arange(self.count)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[rows[i]]), float(scores[i])) for i in top]

    def _shortlist(self, query: np.ndarray, keep: int, mask: np.ndarray | None) -> np.ndarray:
        """Rows of the `keep` best float16 scores (half the bytes of a float32 scan)."""
        import torch

        scores = torch.from_numpy(self._half[: self.count]) @ torch.from_numpy(
            query.astype(np.float16))
        if mask is not None:
            scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
        rows = torch.topk(scores, min(keep, self.count)).indices.numpy()
        return rows if mask is None else rows[mask[rows]]
