"""A namespace's vector index: inner-product search over a contiguous float32 matrix, exact
for small namespaces, an int8 first pass re-scored exactly in float32 for large ones.

Chosen by measurement (README, tools/bench/memory.py): a scan is bound by memory bandwidth, so
large namespaces keep an int8 copy of every row (one scale per row; a quarter of the bytes) and
scan it with torch's int8 weight kernel, then re-score the shortlist exactly in float32. At 100k
x 384 on one core that is 3.3 ms against 5.9 ms for a float16 scan and 7.6-16 ms for float32,
with the same recall as float32 on every data set tried (MiniLM, clustered, isotropic random):
int8 rounding moves a score by ~0.002, far less than what separates the shortlist's tail from
the top k. Approximate indexes scan less but lose recall on hard data: IVF (k-means, probing an
eighth of 256 lists, ~2.5 ms) keeps 0.996 on MiniLM-like vectors but 0.84 on the hashing
embedder's, 0.72 on clustered and 0.29 on random ones; sign (binary) codes reach about 0.8 there
even re-scoring 3,000 candidates; HNSW costs about a millisecond of build per insert and its
recall depends on the data too (see the README). Below 8k rows float32 is as fast.
"""

from __future__ import annotations

import numpy as np

QUANT_FROM = 8192  # rows from which the int8 scan beats float32 (measured: 8k, 0.25 ms each)
QUANT_WIDTH = 64  # the int8 kernel reads rows in blocks: widths not a multiple of 16 crashed it
SHORTLIST = 8  # the int8 scan keeps k * SHORTLIST candidates (at least 64) for re-scoring
EXACT_SUBSET = 8  # a filter allowing under 1/EXACT_SUBSET of the rows scores just those rows


def _quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes with one float32 scale per row (row ~= codes * scale)."""
    scales = np.abs(rows).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.rint(rows / scales[:, None]).astype(np.int8)
    return codes, scales.astype(np.float32)


class VectorIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._codes: np.ndarray | None = None  # int8 rows, once count >= QUANT_FROM
        self._scales: np.ndarray | None = None  # their scales (float32)
        self._row: dict[int, int] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, memory_id: int) -> bool:
        return memory_id in self._row

    @property
    def quantized(self) -> bool:
        """Whether search scans the int8 copy (through torch)."""
        return self._codes is not None

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
            if self._codes is not None and self._scales is not None:
                codes, scales = self._codes, self._scales
                self._codes = np.zeros((capacity, self.dim), dtype=np.int8)
                self._scales = np.ones(capacity, dtype=np.float32)
                self._codes[: self.count] = codes[: self.count]
                self._scales[: self.count] = scales[: self.count]

    def _quantize_all(self) -> None:
        capacity = len(self._ids)
        self._codes = np.zeros((capacity, self.dim), dtype=np.int8)
        self._scales = np.ones(capacity, dtype=np.float32)
        self._set_codes(0, self._vectors[: self.count])

    def _set_codes(self, start: int, rows: np.ndarray) -> None:
        if self._codes is not None and self._scales is not None:
            codes, scales = _quantize(rows)
            self._codes[start:start + len(rows)] = codes
            self._scales[start:start + len(rows)] = scales

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
            self._set_codes(start, self._vectors[start:end])
            self._ids[start:end] = [ids[row] for row in fresh]
            self._row.update((ids[row], start + n) for n, row in enumerate(fresh))
            self.count = end
        if self._codes is None and self.count >= QUANT_FROM and self.dim % QUANT_WIDTH == 0:
            self._quantize_all()

    def _set(self, at: int, vector: np.ndarray) -> None:
        self._vectors[at] = vector
        self._set_codes(at, self._vectors[at:at + 1])

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
            if len(allowed) * EXACT_SUBSET < self.count:  # few rows: score just those, exactly
                rows = np.fromiter((at for i in allowed if (at := self._row.get(i)) is not None),
                                   dtype=np.int64)
                return self._best(rows, self._vectors[rows] @ query, k)
            mask = np.isin(ids, np.fromiter(allowed, dtype=np.int64, count=len(allowed)))
        if self._codes is not None:
            rows = self._shortlist(query, max(64, k * SHORTLIST), mask)
            return self._best(rows, self._vectors[rows] @ query, k)  # exact: rounding can't reorder
        scores = self._vectors[: self.count] @ query
        if mask is not None:
            rows = np.flatnonzero(mask)
            return self._best(rows, scores[rows], k)
        return self._best(np.arange(self.count), scores, k)

    def ranked(self, query: np.ndarray, n: int) -> list[int]:
        """About the `n` best ids (by the int8 scores for a large index), in no order."""
        n = min(n, self.count)
        if n == 0:
            return []
        if self._codes is not None:
            rows = self._shortlist(query.astype(np.float32, copy=False), n, None)
        else:
            scores = self._vectors[: self.count] @ query
            rows = np.argpartition(-scores, n - 1)[:n] if n < self.count else np.arange(n)
        return self._ids[rows].tolist()

    def _best(self, rows: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The `k` best of `rows` by `scores` (aligned), best first, as (id, score)."""
        k = min(k, len(rows))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self._ids[rows[i]]), float(scores[i])) for i in top]

    def _shortlist(self, query: np.ndarray, keep: int, mask: np.ndarray | None) -> np.ndarray:
        """Rows of the `keep` best int8 scores (a quarter of the bytes of a float32 scan)."""
        import torch

        assert self._codes is not None and self._scales is not None
        # torch's int8 weight-only GEMM (the LLM decode kernel): codes . query * scale, in
        # bfloat16, bandwidth-bound on the int8 rows.
        scores = torch._weight_int8pack_mm(
            torch.from_numpy(query).to(torch.bfloat16)[None, :],
            torch.from_numpy(self._codes[: self.count]),
            torch.from_numpy(self._scales[: self.count]).to(torch.bfloat16))[0]
        if mask is not None:
            scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
        rows = torch.topk(scores, min(keep, self.count)).indices.numpy()
        return rows if mask is None else rows[mask[rows]]
