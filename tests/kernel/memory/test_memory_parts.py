"""The memory and storage managers' pure parts: LRU-K against a reference model, the vector
index against brute force, the embedders, and path checking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kernel.memory.embed import HashEmbedder
from kernel.memory.index import VectorIndex
from kernel.memory.lruk import LRUK
from kernel.storage import paths
from sdk.abi import ErrorCode


class ReferenceLRUK:
    """LRU-K by its definition: keep every access time; the victim is the resident key whose
    K-th most recent access is oldest (fewer than K accesses counts as infinitely old), ties
    broken by the oldest last access. O(n) per eviction, obviously right."""

    def __init__(self, k: int) -> None:
        self.k, self.clock = k, 0
        self.times: dict[int, list[int]] = {}
        self.sizes: dict[int, int] = {}

    def access(self, key: int, size: int | None) -> None:
        self.clock += 1
        if key not in self.sizes or size is not None:
            self.sizes[key] = size
        self.times.setdefault(key, []).append(self.clock)

    def victim(self, skip: int | None) -> int | None:
        def rank(key: int) -> tuple[int, int]:
            t = self.times[key]
            return (t[-self.k] if len(t) >= self.k else 0, t[-1])

        keys = [key for key in self.sizes if key != skip]
        return min(keys, key=rank) if keys else None

    def remove(self, key: int, forget: bool) -> None:
        del self.sizes[key]
        if forget:
            del self.times[key]


class LRUKMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.k = 2
        self.real = LRUK(self.k)
        self.model = ReferenceLRUK(self.k)

    keys = st.integers(0, 12)

    @rule(key=keys, size=st.integers(1, 100))
    def admit_or_touch(self, key: int, size: int) -> None:
        self.real.access(key, size)
        self.model.access(key, size)

    @rule(key=keys)
    def touch(self, key: int) -> None:
        if key in self.model.sizes:
            self.real.access(key)
            self.model.access(key, None)

    @rule(key=keys, forget=st.booleans())
    def remove(self, key: int, forget: bool) -> None:
        if key in self.model.sizes:
            assert self.real.remove(key, forget) == self.model.sizes[key]
            self.model.remove(key, forget)

    @rule(skip=st.one_of(st.none(), keys))
    def evict(self, skip: int | None) -> None:
        expected = self.model.victim(skip)
        got = self.real.evict(skip)
        if expected is None:
            assert got is None
        else:
            assert got == (expected, self.model.sizes[expected])
            self.model.remove(expected, forget=False)

    @invariant()
    def same_residents(self) -> None:
        assert set(self.real) == set(self.model.sizes)
        assert self.real.bytes == sum(self.model.sizes.values())


TestLRUK = LRUKMachine.TestCase
TestLRUK.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


def test_lruk_is_scan_resistant() -> None:
    """A hot key touched twice survives a scan of one-touch keys; LRU would evict it."""
    lru = LRUK(2)
    lru.access("hot", 1)
    lru.access("hot")
    lru.access("cold", 1)
    for i in range(10):
        lru.access(i, 1)
        assert lru.evict(skip=i)[0] != "hot"


def test_lruk_forget_history_bounds_only_cold_keys() -> None:
    """The manager calls `forget_history` when too many evicted keys are remembered: the oldest
    cold histories go, resident keys keep theirs, and a forgotten key returns as a stranger."""
    lru = LRUK(2)
    for key in "abcdef":
        lru.access(key, 1)
        lru.access(key)
    for key in "abcd":
        assert lru.remove(key, forget=False) == 1
    assert lru.remembered == 6
    lru.forget_history(keep=1)
    assert lru.remembered == 3 and set(lru) == {"e", "f"}  # e, f and the newest cold key, d
    lru.forget_history(keep=5)
    assert lru.remembered == 3  # nothing to forget
    lru.access("a", 1)  # forgotten: one access, so it is the first to go
    lru.access("d", 1)  # remembered: this is its second access, its history counts
    assert lru.evict() == ("a", 1)
    # d ranks by its 2nd-last access (tick 8, before it was evicted), not as a newcomer.
    assert lru.peek_victim() == (8, 14, "d")
    lru.forget_history(keep=0)
    assert lru.remembered == len(lru) == 3


@given(st.integers(1, 300), st.integers(1, 20), st.integers(0, 2**31))
@settings(max_examples=30, deadline=None)
def test_index_matches_brute_force(n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    index = VectorIndex(8)
    ids = list(range(100, 100 + n))
    index.add(ids, vectors)
    gone = set(ids[::3])
    for memory_id in gone:
        index.remove(memory_id)
    query = rng.standard_normal(8).astype(np.float32)
    scores = {i: float(vectors[i - 100] @ query) for i in ids if i not in gone}
    expected = sorted(scores, key=lambda i: -scores[i])[:k]
    got = index.search(query, k)
    assert [i for i, _ in got] == expected
    allowed = set(list(scores)[::2])
    assert [i for i, _ in index.search(query, k, allowed)] == \
        [i for i in sorted(allowed, key=lambda i: -scores[i])][:k]


def test_hash_embedder_is_deterministic_and_semantic_enough() -> None:
    e = HashEmbedder()
    a, b, c = e.embed(["the cat sat on the mat", "a cat on a mat", "quarterly tax report"])
    assert np.allclose(e.embed(["the cat sat on the mat"])[0], a)
    assert abs(np.linalg.norm(a) - 1) < 1e-5 and a @ b > a @ c


@pytest.mark.parametrize("path, code", [
    ("../etc/passwd", ErrorCode.EPERM),
    ("a/../../b", ErrorCode.EPERM),
    ("/etc/passwd", ErrorCode.EPERM),
    ("a/b/..", ErrorCode.EPERM),
    ("\uff0e\uff0e/x", ErrorCode.EPERM),          # fullwidth dots fold to '..'
    ("a\uff0fb", ErrorCode.EPERM),                # fullwidth solidus folds to '/'
    ("\uff0fetc", ErrorCode.EPERM),
    ("a\\..\\b", ErrorCode.EPERM),                # backslash separators
    ("a\x00b", ErrorCode.EINVAL),
    ("a\nb", ErrorCode.EINVAL),
    ("a\u202eb", ErrorCode.EINVAL),               # right-to-left override
    ("a\u200bb", ErrorCode.EINVAL),               # zero-width space
    ("cafe\u0301", ErrorCode.EINVAL),             # not NFC
    ("a//b", ErrorCode.EINVAL),
    ("./a", ErrorCode.EINVAL),
    ("", ErrorCode.EINVAL),
    ("x" * 256, ErrorCode.EINVAL),
])
def test_path_escapes_are_refused(path: str, code: ErrorCode) -> None:
    with pytest.raises(paths.PathError) as caught:
        paths.clean(path)
    assert caught.value.code == code


def test_clean_paths_and_resources() -> None:
    assert paths.clean("notes/todo list.md") == "notes/todo list.md"
    assert paths.clean("dir/") == "dir"
    assert paths.clean("", root_ok=True) == ""
    assert paths.clean("caf\u00e9/\u6587\u4ef6") == "caf\u00e9/\u6587\u4ef6"
    assert paths.resource("bob", "a b/%2F") == "fs/agent/bob/a%20b/%252F"
    assert paths.parents("a/b/c") == ["a", "a/b"]
    with pytest.raises(paths.PathError):
        paths.resource("bob", "x" * 250)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_no_clean_path_escapes(text: str) -> None:
    try:
        cleaned = paths.clean(text)
    except paths.PathError:
        return
    assert not cleaned.startswith("/") and ".." not in cleaned.split("/")
    assert "\x00" not in cleaned and "" not in cleaned.split("/")
    resource = paths.resource("owner", cleaned) if len(cleaned) < 100 else None
    if resource:
        assert resource.isprintable() and " " not in resource


@given(st.integers(0, 2**31), st.integers(1, 30), st.booleans())
@settings(max_examples=5, deadline=None)
def test_int8_shortlist_matches_exact(seed: int, k: int, filtered: bool) -> None:
    """Large namespaces scan an int8 copy, then re-score exactly: same answer as float32."""
    import kernel.memory.index as index_module

    rng = np.random.default_rng(seed)
    n, dim = 3000, 64
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    old = index_module.QUANT_FROM
    index_module.QUANT_FROM = 1000
    try:
        index = VectorIndex(dim)
        index.add(list(range(n)), vectors)
        for memory_id in range(0, n, 7):
            index.remove(memory_id)
        alive = [i for i in range(n) if i % 7]
        allowed = set(alive[::3]) if filtered else None
        query = rng.standard_normal(dim).astype(np.float32)
        pool = sorted(allowed) if filtered else alive
        expected = sorted(pool, key=lambda i: -float(vectors[i] @ query))[:k]
        assert [i for i, _ in index.search(query, k, allowed)] == expected
    finally:
        index_module.QUANT_FROM = old


def test_embed_worker_restarts_with_doubling_backoff_and_fails_each_held_batch() -> None:
    """The supervised embedder thread: an embedder that keeps raising ends its thread each
    time; the batch it held is answered None at once, and each restart waits twice as long
    (capped), until a batch succeeds, which resets the backoff."""
    import queue
    import threading

    from kernel.memory.worker import EmbedWorker

    class Flaky(HashEmbedder):
        failures = 3

        def embed(self, texts: list[str]) -> np.ndarray:
            if Flaky.failures:
                Flaky.failures -= 1
                raise RuntimeError("model file unreadable")
            return super().embed(texts)

    loop: queue.SimpleQueue = queue.SimpleQueue()  # stands in for the kernel's loop thread
    delays: list[float] = []

    def after(seconds: float, fn: object) -> None:
        delays.append(seconds)
        loop.put(fn)  # run at once: the test checks the delays asked for, not waits them

    worker = EmbedWorker(Flaky(slow=True), loop.put, after=after, backoff=0.5, backoff_max=1.5)
    worker.start()
    got: list[object] = []
    answered = threading.Event()

    def done(vectors: object) -> None:
        got.append(vectors)
        answered.set()

    def one() -> object:
        answered.clear()
        worker.submit(["text"], done)
        while not answered.is_set():
            loop.get(timeout=5)()
        return got[-1]

    assert [one() is None for _ in range(4)] == [True, True, True, False]
    assert delays == [0.5, 1.0, 1.5] and worker.restarts == 3 and worker.state == "ready"
    assert worker.error == "RuntimeError: model file unreadable"
    Flaky.failures = 1  # it served since: the next failure backs off from the start again
    assert one() is None and isinstance(one(), np.ndarray)
    assert delays[3:] == [0.5]
    worker.stop()
