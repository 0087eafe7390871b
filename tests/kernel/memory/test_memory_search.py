"""Vector search off the dispatch loop: the index thread's consistency with the loop's changes
(in-process, on a real database), and through a kernel with a large namespace: the loop keeps
answering while the index loads, searches racing adds, updates and deletes return only live,
matching memories, and all of it holds after a restart."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import sdk
from kernel.db import Database
from kernel.memory.embed import DIM
from kernel.memory.indexes import Found, IndexThread
from tests.conftest import KernelProcess

# > index.QUANT_FROM and indexes.LOAD_CHUNK (8192 each): the int8 path, a load in chunks. (40k
# took seconds more: the racing readers' filtered searches scan the whole namespace; the
# order the index-load test checks holds however short the load is.)
BIG = 12_000
NS = "bench/big"


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def insert(db: Database, namespace: str, vector: np.ndarray, content: str = "x") -> int:
    cur = db.write("INSERT INTO memories (namespace, content, metadata, size, embedding, "
                   "embedder, created_at, updated_at) VALUES (?,?,'{}',1,?,'hash',0,0)",
                   (namespace, content, vector.tobytes()))
    return int(cur.lastrowid)


def wait_for(posted: list[Callable[[], None]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not posted:
        assert time.monotonic() < deadline, "the index thread did not answer"
        time.sleep(0.005)
    posted.pop(0)()


def test_index_thread_replays_changes_its_snapshot_may_lack(tmp_path: Path) -> None:
    """A namespace first loaded while the loop holds uncommitted changes to it still ends up
    with exactly the loop's view; later changes apply in order."""
    db = Database(tmp_path / "kernel.db")
    rng = np.random.default_rng(1)
    a, b, c, d = unit(rng.standard_normal((4, DIM)))
    old = insert(db, "n", a)
    db.commit()
    posted: list[Callable[[], None]] = []
    thread = IndexThread(db.path, "hash", lambda: db.commits, posted.append)
    thread.start()
    try:
        new = insert(db, "n", b)  # uncommitted: the thread's snapshot cannot see it
        thread.put("n", new, b)
        db.write("DELETE FROM memories WHERE id=?", (old,))  # uncommitted: snapshot has it
        thread.remove("n", old)
        answers: list[Found | None] = []
        thread.search("n", a, "", 5, {}, False, answers.append)
        wait_for(posted)
        assert answers[-1] is not None and [i for i, _ in answers[-1].hits] == [new]
        db.commit()
        early = insert(db, "m", c)
        thread.put("m", early, c)
        db.commit()  # committed before "m" loads: the snapshot holds it, no replay needed
        later = insert(db, "n", d)
        thread.put("n", later, d)
        thread.search("n", d, "", 1, {}, False, answers.append)
        wait_for(posted)
        assert answers[-1] is not None and answers[-1].hits[0][0] == later
        thread.search("m", c, "", 5, {}, True, answers.append)
        wait_for(posted)
        assert answers[-1] is not None and [i for i, _ in answers[-1].hits] == [early]
        assert thread.stats()["namespaces_indexed"] == 2
    finally:
        thread.stop()
        db.close()


def filler(state: Path) -> None:
    """BIG memories with random unit vectors, written straight into the kernel's database."""
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((BIG, DIM)))
    db = sqlite3.connect(state / "kernel.db")
    with db:
        db.executemany(
            "INSERT INTO memories (namespace, content, metadata, size, embedding, embedder, "
            "created_at, updated_at) VALUES (?,?,'{}',70,?,'hash',0,0)",
            ((NS, f"filler {i}", v.tobytes()) for i, v in enumerate(vectors)))
    db.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    tmp = tmp_path_factory.mktemp("memsearch")
    config = tmp / "kernel.toml"
    config.write_text('[kernel]\nmemory_embedder = "hash"\nmemory_quota = 100000000\n')
    k = KernelProcess(tmp / "state")
    k.extra_args = ["--config", str(config)]
    k.start()
    k.stop()
    filler(k.state_dir)
    k.start()
    yield k
    k.stop()


def test_loop_answers_while_the_index_loads(big: KernelProcess) -> None:
    """The first search of a BIG namespace loads it on the index thread: meanwhile the call
    is parked and other calls complete."""
    # One batch on the rings: the kernel drains the three entries in one pass, so the stats
    # call runs right after the search, whatever the machine's load does to this process. A
    # loop that loaded inline would have answered the search before reading the stats: no
    # call parked then.
    with sdk.connect(state_dir=big.state_dir, timeout=60, rings=True) as conn:
        assert conn.uses_rings
        with conn.batch() as b:
            search = b.memory.search("filler 7", k=3, namespace=NS)
            stats = b.sys.stats()
            null = b.sys.null()
        hits, seen = search.result(), stats.result()
        assert null.result() is None
    assert seen.calls_parked >= 1  # the search, parked on the index thread's load
    assert len(hits) == 3 and all(h.match == "vector" for h in hits)
    with big.connect() as c:
        memory = c.sys.stats().memory
        assert memory["index_loads"] == 1 and memory["namespaces_indexed"] == 1


def test_searches_racing_changes_return_live_matching_memories(big: KernelProcess) -> None:
    deleted: set[int] = set()
    dropped: set[int] = set()
    added: dict[int, str] = {}

    async def writer(conn: sdk.AsyncConnection) -> None:
        for i in range(30):
            text = f"race memory {i} about the lighthouse keeper number {i * 7919}"
            memory_id = await conn.memory.add(text, {"tag": "keep"}, namespace=NS)
            added[memory_id] = text
            # Acknowledged, so the next search must see it: the exact text scores 1.0.
            assert (await conn.memory.search(text, k=1, namespace=NS))[0].id == memory_id
            if i % 3 == 0:
                await conn.memory.delete(memory_id, namespace=NS)
                deleted.add(memory_id)
                hits = await conn.memory.search(text, k=5, namespace=NS)
                assert memory_id not in {h.id for h in hits}
            elif i % 3 == 1:
                await conn.memory.update(memory_id, metadata={"tag": "drop"}, namespace=NS)
                dropped.add(memory_id)

    async def reader(conn: sdk.AsyncConnection, stop: asyncio.Event) -> int:
        searches = 0
        while not stop.is_set():
            gone, off = set(deleted), set(dropped)  # acknowledged before this search is sent
            query = added[max(added)] if added else "lighthouse keeper"
            hits = await conn.memory.search(query, k=10, namespace=NS, filter={"tag": "keep"})
            assert not {h.id for h in hits} & (gone | off)
            assert all(h.metadata == {"tag": "keep"} for h in hits)
            searches += 1
        return searches

    async def main() -> int:
        async with sdk.connect_async(state_dir=big.state_dir, timeout=60) as conn:
            stop = asyncio.Event()
            readers = [asyncio.ensure_future(reader(conn, stop)) for _ in range(2)]
            try:
                await writer(conn)
            finally:
                stop.set()
            return sum(await asyncio.gather(*readers))

    assert asyncio.run(main()) > 0
    with big.connect() as c:
        for memory_id, text in added.items():
            hits = {h.id for h in c.memory.search(text, k=3, namespace=NS)}
            assert (memory_id in hits) == (memory_id not in deleted)
    big.stop()
    big.start()  # the index is rebuilt from SQLite: same answers
    with big.connect() as c:
        for memory_id, text in added.items():
            hits = c.memory.search(text, k=3, namespace=NS, filter={"tag": "keep"})
            alive = memory_id not in deleted and memory_id not in dropped
            assert (memory_id in {h.id for h in hits}) == alive
        assert c.sys.stats().memory["index_loads"] == 1


def test_a_load_does_not_hold_up_other_namespaces(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a load's chunks the thread serves searches of loaded namespaces; the loading
    namespace's own changes wait and still apply in order."""
    import kernel.memory.indexes as indexes

    monkeypatch.setattr(indexes, "LOAD_CHUNK", 50)
    db = Database(tmp_path / "kernel.db")
    rng = np.random.default_rng(2)
    vectors = unit(rng.standard_normal((3001, DIM)))
    for vector in vectors[:3000]:
        insert(db, "big", vector)
    small = insert(db, "small", vectors[3000])
    db.commit()
    posted: list[Callable[[], None]] = []
    thread = IndexThread(db.path, "hash", lambda: db.commits, posted.append)
    thread.start()
    try:
        order: list[str] = []
        thread.search("small", vectors[3000], "", 1, {}, False, lambda f: order.append("small"))
        wait_for(posted)
        thread.search("big", vectors[0], "", 1, {}, False, lambda f: order.append("big"))
        thread.search("small", vectors[3000], "", 1, {}, False, lambda f: order.append("small"))
        late = insert(db, "big", vectors[3000])  # arrives while "big" loads
        thread.put("big", late, vectors[3000])
        answers: list[Found | None] = []
        thread.search("big", vectors[3000], "", 1, {}, False, answers.append)
        for _ in range(3):
            wait_for(posted)
        assert order == ["small", "small", "big"]
        assert answers[0] is not None and answers[0].hits[0][0] == late != small
    finally:
        thread.stop()
        db.close()


def test_filtered_search_matches_brute_force(tmp_path: Path) -> None:
    """A filter is checked on growing shortlists (or, when too selective, on the whole
    namespace); either way the answer is the exact best of the allowed memories."""
    db = Database(tmp_path / "kernel.db")
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((20_000, DIM)))
    ids = []
    for i, vector in enumerate(vectors):
        cur = db.write("INSERT INTO memories (namespace, content, metadata, size, embedding, "
                       "embedder, created_at, updated_at) VALUES ('f','x',?,1,?,'hash',0,0)",
                       (f'{{"g": {i % 4}, "rare": {int(i % 5000 == 7)}}}', vector.tobytes()))
        ids.append(int(cur.lastrowid))
    db.commit()
    posted: list[Callable[[], None]] = []
    thread = IndexThread(db.path, "hash", lambda: db.commits, posted.append)
    thread.start()
    try:
        for filter, keep in (({"g": 1}, lambda i: i % 4 == 1),        # shortlists suffice
                             ({"rare": 1}, lambda i: i % 5000 == 7)):  # 4 rows: a full pass
            query = unit(rng.standard_normal((1, DIM)))[0]
            answers: list[Found | None] = []
            thread.search("f", query, "", 6, filter, False, answers.append)
            wait_for(posted)
            pool = [i for i in range(len(vectors)) if keep(i)]
            expected = sorted(pool, key=lambda i: -float(vectors[i] @ query))[:6]
            assert answers[0] is not None
            assert [i for i, _ in answers[0].hits] == [ids[i] for i in expected]
    finally:
        thread.stop()
        db.close()
