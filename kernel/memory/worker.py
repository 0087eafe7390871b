"""Embeds texts off the dispatch loop: one thread drains every queued request into one batch,
runs the model once, and hands each result back to the loop through `Calls.post`."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import numpy as np

from kernel.memory.embed import Embedder

log = logging.getLogger("kernel.memory")

Done = Callable[[np.ndarray | None], None]  # None: the embedder failed


class EmbedWorker:
    def __init__(self, embedder: Embedder, post: Callable[[Callable[[], None]], None],
                 max_batch: int = 256) -> None:
        self.embedder = embedder
        self._post = post
        self._queue: queue.Queue[tuple[list[str], Done] | None] = queue.Queue()
        self._max_batch = max_batch
        self._thread = threading.Thread(target=self._run, name="embedder", daemon=True)
        self.failed = False
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def submit(self, texts: list[str], done: Done) -> None:
        self._queue.put((texts, done))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            size = len(first[0])
            while size < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
                size += len(job[0])
            texts = [t for job_texts, _ in jobs for t in job_texts]
            try:
                vectors: np.ndarray | None = self.embedder.embed(texts)
                self.batches += 1
            except Exception:
                log.exception("embedder failed; memory search falls back to keywords")
                self.failed = True
                vectors = None
            start = 0
            for job_texts, done in jobs:
                part = None if vectors is None else vectors[start:start + len(job_texts)]
                start += len(job_texts)
                self._post(lambda done=done, part=part: done(part))
