"""Waiting jobs kept sorted by a key that does not change while they wait."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterator
from typing import Any

from kernel.llm.sched.job import Job

Key = Callable[[Job], tuple[Any, ...]]


class RunQueue:
    """A sorted list: insertion and removal are a binary search and a memmove, iteration is free.

    The job id ends every key, so two entries never compare equal and jobs are never compared.
    """

    def __init__(self, key: Key) -> None:
        self._key = key
        self._items: list[tuple[tuple[Any, ...], Job]] = []
        self._keys: dict[int, tuple[Any, ...]] = {}

    def add(self, job: Job) -> None:
        key = (*self._key(job), job.id)
        self._keys[job.id] = key
        insort(self._items, (key, job))

    def remove(self, job: Job) -> None:
        key = self._keys.pop(job.id)
        del self._items[bisect_left(self._items, (key,))]

    def __iter__(self) -> Iterator[Job]:
        return (job for _, job in self._items)

    def __len__(self) -> int:
        return len(self._items)
