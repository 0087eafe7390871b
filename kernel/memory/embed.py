"""Text embedders: all-MiniLM-L6-v2 (the real one) and a hashing embedder (tests, fallback).

Both map a batch of texts to unit-length float32 rows, so cosine similarity is a dot product.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from sdk.models import loading

log = logging.getLogger("kernel.memory")

DIM = 384  # all-MiniLM-L6-v2's width; the hashing embedder matches it
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class Embedder(Protocol):
    name: str
    dim: int
    slow: bool  # True: run it on a worker thread, never on the dispatch loop

    def embed(self, texts: list[str]) -> np.ndarray: ...


class HashEmbedder:
    """Deterministic bag of words and word bigrams hashed into DIM buckets: texts that share
    words are near each other. No model; instant. `slow=True` makes the kernel treat it like a
    model (worker thread), which tests use to exercise that path."""

    name = "hash"
    dim = DIM

    def __init__(self, slow: bool = False) -> None:
        self.slow = slow

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            tokens = words(text)
            for feature in tokens + [a + " " + b for a, b in itertools.pairwise(tokens)]:
                digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
                bucket = int.from_bytes(digest[:4], "little") % self.dim
                out[row, bucket] += 1.0 if digest[4] & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


def one_torch_thread() -> None:
    """Make torch ops on the calling thread single-threaded, leaving other threads alone.

    A two-thread int8 scan waits for its slower thread, so when another process holds a core
    it took 16 ms instead of 4 (measured at 100k, end to end). torch's thread count is
    OpenMP's, per thread, but `set_num_threads` also sets the default that threads not yet
    using torch start from: put that back from a throwaway thread."""
    import torch

    default = torch.get_num_threads()  # also fixes this thread's own OpenMP setting now
    torch.set_num_threads(1)
    if default != 1:
        restore = threading.Thread(target=torch.set_num_threads, args=(default,))
        restore.start()
        restore.join()


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 through transformers: mean pooling over the
    attention mask, then L2 normalisation (what its modules.json prescribes)."""

    name = "all-minilm-l6-v2"
    dim = DIM
    slow = True
    max_tokens = 256  # sentence_bert_config.json: max_seq_length
    batch = 64

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        self.directory = directory
        self.threads = threads
        self._model = self._tokenizer = None
        self._lock = threading.Lock()
        self._thread = threading.local()  # .single: this thread's torch made single-threaded

    def _load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if self.threads:  # process-wide: only for a process that runs nothing else (benchmarks)
            torch.set_num_threads(self.threads)
        with loading:  # one model built at a time in a process: see sdk.models.loading
            self._tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
            self._model = AutoModel.from_pretrained(self.directory, local_files_only=True,
                                                    dtype=torch.float32).eval()
        log.info("embedder loaded", extra={"embedder": self.name, "dir": str(self.directory)})

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            if self.threads is None and not getattr(self._thread, "single", False):
                # Not a second OpenMP team beside the LLM's: libgomp stops spinning its idle
                # workers once it manages more threads than there are cores, and every model
                # step then pays futex wakes (1.2-1.3x a step on 2 cores; docs/benchmarks.md).
                one_torch_thread()
                self._thread.single = True
            rows = []
            with torch.inference_mode():
                for start in range(0, len(texts), self.batch):
                    batch = self._tokenizer(texts[start:start + self.batch], padding=True,
                                            truncation=True, max_length=self.max_tokens,
                                            return_tensors="pt")
                    hidden = self._model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    rows.append(torch.nn.functional.normalize(pooled, dim=1).float().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
