"""LRU-K replacement (O'Neil, O'Neil & Weikum, SIGMOD'93): evict the item whose K-th most recent
access lies furthest in the past; items seen fewer than K times go first, oldest first.

Pure bookkeeping, no I/O: the memory manager decides what "resident" means and when to evict.
A heap with lazy invalidation keeps access and eviction at O(log n).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterator


class LRUK:
    """Resident items with their sizes and access histories, ordered for eviction."""

    def __init__(self, k: int = 2) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.clock = 0  # logical time: one tick per access, so every access time is unique
        self.bytes = 0
        self._sizes: dict[Hashable, int] = {}
        self._history: dict[Hashable, deque[int]] = {}
        self._heap: list[tuple[int, int, Hashable]] = []  # (K-th access or 0, last access, key)

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._sizes)

    @property
    def remembered(self) -> int:
        """Keys with a retained history, resident or not."""
        return len(self._history)

    def size_of(self, key: Hashable) -> int:
        return self._sizes[key]

    def _rank(self, key: Hashable) -> tuple[int, int]:
        history = self._history[key]
        kth = history[0] if len(history) == self.k else 0  # fewer than K accesses: infinitely old
        return kth, history[-1]

    def access(self, key: Hashable, size: int | None = None) -> None:
        """Record a reference; admits the key (with `size`) if it is not resident, or updates
        its size if one is given."""
        self.clock += 1
        if key not in self._sizes:
            if size is None:
                raise KeyError(key)
            self._sizes[key] = size
            self.bytes += size
            # A returning key keeps its history (LRU-K's "retained information").
            self._history.setdefault(key, deque(maxlen=self.k))
        elif size is not None:
            self.bytes += size - self._sizes[key]
            self._sizes[key] = size
        self._history[key].append(self.clock)
        kth, last = self._rank(key)
        heapq.heappush(self._heap, (kth, last, key))
        if len(self._heap) > 4 * len(self._sizes) + 64:
            self._compact()

    def remove(self, key: Hashable, forget: bool = True) -> int:
        """Drop a resident key; returns its size. `forget=False` keeps its access history."""
        size = self._sizes.pop(key)
        self.bytes -= size
        if forget:
            del self._history[key]
        return size

    def peek_victim(self, skip: Hashable = None) -> tuple[int, int, Hashable] | None:
        """The rank and key eviction would take next (never `skip`), without taking it."""
        held = None
        try:
            while self._heap:
                kth, last, key = self._heap[0]
                if key not in self._sizes or self._rank(key) != (kth, last):
                    heapq.heappop(self._heap)  # stale: the key was accessed again or removed
                elif key == skip and held is None:
                    held = heapq.heappop(self._heap)
                else:
                    return kth, last, key
            return None
        finally:
            if held is not None:
                heapq.heappush(self._heap, held)

    def evict(self, skip: Hashable = None) -> tuple[Hashable, int] | None:
        """Remove and return the victim and its size (its history is retained); `skip` is
        never chosen (the item being admitted right now)."""
        victim = self.peek_victim(skip)
        if victim is None:
            return None
        key = victim[2]
        return key, self.remove(key, forget=False)

    def forget_history(self, keep: int) -> None:
        """Bound retained histories of non-resident keys to about `keep` entries."""
        cold = [key for key in self._history if key not in self._sizes]
        for key in cold[: max(0, len(cold) - keep)]:
            del self._history[key]

    def _compact(self) -> None:
        self._heap = [(*self._rank(key), key) for key in self._sizes]
        heapq.heapify(self._heap)
