"""Embeds texts off the dispatch loop: one thread drains every queued request into one batch,
runs the model once, and hands each result back to the loop through `Calls.post`.

The thread is supervised like an agent with a restart policy: if the embedder fails (raises) or
the thread dies (anything escaping it, even an exception injected into it), the batch it held is
answered as failed (None) at once, and a new thread is started after a backoff that doubles while
it keeps failing. Until then `failed` is true and callers fall back (keywords) or get EAGAIN.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import numpy as np

from kernel.memory.embed import Embedder

log = logging.getLogger("kernel.memory")

Done = Callable[[np.ndarray | None], None]  # None: the embedder failed
Job = tuple[list[str], Done]


class EmbedWorker:
    def __init__(self, embedder: Embedder, post: Callable[[Callable[[], None]], None],
                 max_batch: int = 256,
                 after: Callable[[float, Callable[[], None]], object] | None = None,
                 backoff: float = 0.5, backoff_max: float = 30.0,
                 on_restart: Callable[[], None] = lambda: None) -> None:
        self.embedder = embedder
        self._post = post
        self._after = after
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._max_batch = max_batch
        self._backoff, self._backoff_max = backoff, backoff_max
        self._on_restart = on_restart
        self._thread: threading.Thread | None = None
        self._batch: list[Job] = []  # the jobs the thread holds now (answered if it dies)
        self._stopping = False
        self.state = "starting"  # starting | ready | restarting | failed (no supervisor)
        self.error: str | None = None  # why it last failed
        self.restarts = 0  # restarts since boot
        self._failing = 0  # failures in a row (the backoff's exponent)
        self.batches = 0

    @property
    def failed(self) -> bool:
        return self.state in ("restarting", "failed")

    def start(self) -> None:
        self.state = "ready"
        self._thread = threading.Thread(target=self._guarded, name="embedder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, texts: list[str], done: Done) -> None:
        self._queue.put((texts, done))

    def info(self) -> tuple[str, int, str | None]:
        """(state, restarts, error) for `sys.stats`."""
        return self.state, self.restarts, self.error

    # --- the embedder thread ------------------------------------------------------------------

    def _guarded(self) -> None:
        why = "the embedder thread ended"
        try:
            self._run()
            return
        except BaseException as exc:  # a dying thread: whatever killed it
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not isinstance(exc, Exception):
                log.error("embedder thread died", extra={"reason": why})
            else:
                log.exception("embedder failed")
        finally:
            # Whatever the thread held is answered as failed now, not at its deadline.
            held, self._batch = self._batch, []
            for _, done in held:
                self._post(lambda done=done: done(None))
        if not self._stopping:
            self._post(lambda: self._died(why))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = self._batch = [first]
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
            vectors = self.embedder.embed(texts)  # raising ends the thread: see _guarded
            self.batches += 1
            self._failing = 0  # it serves again: the next failure backs off from the start
            self._batch = []
            start = 0
            for job_texts, done in jobs:
                part = vectors[start:start + len(job_texts)]
                start += len(job_texts)
                self._post(lambda done=done, part=part: done(part))

    # --- the loop thread's side: supervision --------------------------------------------------

    def _died(self, why: str) -> None:
        self.error = why
        if self._after is None:
            self.state = "failed"  # nobody to restart it (tests of the bare worker)
            return
        self.state = "restarting"
        delay = min(self._backoff * 2 ** self._failing, self._backoff_max)
        self._failing += 1
        log.warning("embedder restarting", extra={"reason": why, "in_s": delay})
        self._after(delay, self._restart)

    def _restart(self) -> None:
        if self._stopping:
            return
        self.restarts += 1
        self.start()
        self._on_restart()
