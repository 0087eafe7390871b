"""Memory manager benchmark: add/get/search latency and throughput at 1k, 10k and 100k memories
in one namespace, through a booted kernel; the vector index's recall@10 against exact search.

    .venv/bin/python tools/bench/memory.py [--scales 1000,10000,100000] [--hnsw]

(a) End to end: a kernel with the hashing embedder (so the numbers are the kernel's own cost:
    syscall, SQLite commit, index, RAM tier), its namespace bulk-loaded to each scale before
    boot (adding 100k through syscalls takes minutes), then timed `memory.add` / `memory.get` /
    `memory.search` calls from one SDK client. The first search of the namespace loads its
    index from SQLite (on the kernel's index thread); it is reported apart ("first search",
    and the kernel's own load time from sys.stats), not in the search percentiles.
(b) The index alone on realistic vectors: all-MiniLM-L6-v2 embeddings of generated texts when
    the model is pulled (a base set embedded for real, the rest its neighbours: a random base
    vector plus noise, renormalised, since embedding 100k texts on 2 shared cores takes
    ~20 min), search p50/p99 and recall@10 against exact search; `--hnsw` adds hnswlib. At the
    largest scale also harder data: the hashing embedder's vectors of (a), clustered and
    isotropic random vectors, and a float32 exact scan for reference. Recall counts a hit
    whose exact score ties the 10th best as found (the hashing embedder makes many ties).
(c) With the model pulled: MiniLM embedding throughput and a memory.search end to end with it.
(d) Where a search's time goes at the largest scale, piece by piece, in-process: embedding the
    query, the index scan, a metadata filter's SQL pass, the thread hand-off, reading the hits'
    rows, encoding the reply.
Last line: `RESULT search_p50_ms=… recall10=…` (kernel search p50 at the largest scale, and
the kernel index's recall@10).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernel.memory.embed import HashEmbedder, MiniLMEmbedder  # noqa: E402
from kernel.memory.index import QUANT_FROM, VectorIndex  # noqa: E402
from sdk import models  # noqa: E402
from tests.conftest import KernelProcess  # noqa: E402

TOPICS = ["travel", "cooking", "finance", "health", "music", "code", "garden", "sports",
          "weather", "family", "books", "movies", "cars", "pets", "science", "history"]
_PROSE = ("plan trip flight hotel budget recipe soup garlic oven invoice tax salary loan doctor "
          "sleep run guitar song album bug deploy server test rose soil rain tennis goal match "
          "storm sun cousin birthday novel chapter film actor engine tire puppy cat planet atom "
          "war empire meeting friday call email report deadline coffee tea bread river mountain")
WORDS = _PROSE.split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(TOPICS)} note {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(6, 16)))
            for i in range(n)]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def ms(values: list[float]) -> str:
    return f"{pct(values, 50) * 1000:7.2f} {pct(values, 99) * 1000:7.2f}"


def bulk_load(db_path: Path, namespace: str, corpus: list[str], vectors: np.ndarray,
              embedder: str) -> None:
    """Fill a namespace straight into the kernel's database (before boot)."""
    db = sqlite3.connect(db_path)
    now = time.time()
    with db:
        cur = db.executemany(
            "INSERT INTO memories (namespace, content, metadata, size, embedding, embedder, "
            "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            ((namespace, t, "{}", len(t) + 66, v.tobytes(), embedder, now, now)
             for t, v in zip(corpus, vectors, strict=True)))
        del cur
        db.execute("INSERT INTO memories_fts(memories_fts) VALUES('rebuild')")
    db.close()


def end_to_end(scales: list[int], ops: int) -> dict[int, dict[str, list[float]]]:
    results = {}
    embedder = HashEmbedder()
    for scale in scales:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "kernel.toml"
            config.write_text('[kernel]\nmemory_embedder = "hash"\nmemory_quota = 1000000000\n'
                              'memory_ram_budget = 1000000000\nmemory_ram_quota = 1000000000\n')
            k = KernelProcess(Path(tmp) / "state")
            k.extra_args = ["--config", str(config)]
            k.start()
            k.stop()
            corpus = texts(scale)
            t0 = time.perf_counter()
            bulk_load(k.state_dir / "kernel.db", "bench/ns", corpus, embedder.embed(corpus),
                      "hash")
            load_s = time.perf_counter() - t0
            k.start()
            try:
                with k.connect(timeout=120) as c:
                    t0 = time.perf_counter()
                    c.memory.search("warmup", namespace="bench/ns")  # loads the index
                    first = time.perf_counter() - t0
                    kernel_load = c.sys.stats().memory["index_load_ms"] / 1000
                    queries = texts(ops, seed=7)
                    rng = random.Random(1)
                    r: dict[str, list[float]] = {"add": [], "get": [], "search": [],
                                                 "keyword": []}
                    start = time.perf_counter()
                    for q in queries:
                        t0 = time.perf_counter()
                        c.memory.add(q, {"bench": True}, namespace="bench/ns")
                        r["add"].append(time.perf_counter() - t0)
                    r["add_tput"] = [ops / (time.perf_counter() - start)]
                    for _ in range(ops):
                        t0 = time.perf_counter()
                        c.memory.get(rng.randint(1, scale), namespace="bench/ns")
                        r["get"].append(time.perf_counter() - t0)
                    start = time.perf_counter()
                    for q in queries[: max(50, ops // 2)]:
                        t0 = time.perf_counter()
                        c.memory.search(q, k=10, namespace="bench/ns", mode="vector")
                        r["search"].append(time.perf_counter() - t0)
                    r["search_tput"] = [len(r["search"]) / (time.perf_counter() - start)]
                    for q in queries[:50]:
                        t0 = time.perf_counter()
                        c.memory.search(q, k=10, namespace="bench/ns", mode="keyword")
                        r["keyword"].append(time.perf_counter() - t0)
                    r["load"] = [load_s, first, kernel_load]
            finally:
                k.stop()
        results[scale] = r
    return results


def realistic_vectors(n: int, minilm: MiniLMEmbedder | None,
                      rng: np.random.Generator) -> tuple[np.ndarray, str]:
    base_n = min(n, 2000)
    base_texts = texts(base_n, seed=3)
    if minilm is not None:
        base, kind = minilm.embed(base_texts), "MiniLM"
    else:
        base, kind = HashEmbedder().embed(base_texts), "hash"
    if n == base_n:
        return base, f"{kind} x{n}"
    picks = base[rng.integers(0, base_n, n)]
    noisy = picks + rng.standard_normal(picks.shape).astype(np.float32) * 0.35 / np.sqrt(
        picks.shape[1])
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    noisy[:base_n] = base
    return noisy.astype(np.float32), f"{kind} x{base_n} + neighbours"


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def hard_sets(n: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, vectors, queries): data an approximate index finds hard."""
    dim = 384
    hashed = HashEmbedder()
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    clustered = unit(centres[rng.integers(0, 1000, n)]
                     + rng.standard_normal((n, dim)).astype(np.float32) * 0.7)
    return [
        ("hashing embedder (a)", hashed.embed(texts(n)), hashed.embed(texts(200, seed=7))),
        ("1000 clusters", clustered, unit(clustered[rng.integers(0, n, 200)] + rng.standard_normal(
            (200, dim)).astype(np.float32) * 0.3)),
        ("isotropic random", unit(rng.standard_normal((n, dim)).astype(np.float32)),
         unit(rng.standard_normal((200, dim)).astype(np.float32))),
    ]


def measure(vectors: np.ndarray, queries: np.ndarray, search) -> tuple[list[float], float]:
    """Latencies of `search(q) -> ids` and its recall@10; ties with the 10th exact score
    count as hits."""
    exact = queries @ vectors.T
    tenth = -np.partition(-exact, 9, axis=1)[:, 9]
    lat, hit = [], 0
    for row, q in enumerate(queries):
        t0 = time.perf_counter()
        ids = search(q)
        lat.append(time.perf_counter() - t0)
        hit += sum(exact[row, i] >= tenth[row] - 1e-6 for i in ids[:10])
    return lat, hit / (10 * len(queries))


def kernel_index(vectors: np.ndarray) -> tuple[VectorIndex, float]:
    index = VectorIndex(vectors.shape[1])
    t0 = time.perf_counter()
    index.add(list(range(len(vectors))), vectors)
    return index, time.perf_counter() - t0


def top10(index: VectorIndex) -> Callable[[np.ndarray], list[int]]:
    return lambda q: [i for i, _ in index.search(q, 10)]


def index_kind(n: int) -> str:
    return "int8 scan + exact" if n >= QUANT_FROM else "exact float32"


def index_only(scales: list[int], hnsw: int, minilm: MiniLMEmbedder | None) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for scale in scales:
        vectors, kind = realistic_vectors(scale, minilm, rng)
        queries = unit(vectors[rng.integers(0, scale, 200)] + rng.standard_normal(
            (200, vectors.shape[1])).astype(np.float32) * 0.02)
        index, build = kernel_index(vectors)
        lat, recall = measure(vectors, queries, top10(index))
        rows.append({"scale": scale, "index": index_kind(scale), "vectors": kind,
                     "build_s": build, "lat": lat, "recall": recall})
        if scale <= hnsw:
            import hnswlib

            exact = [set(np.argsort(-(vectors @ q))[:10].tolist()) for q in queries]
            h = hnswlib.Index(space="ip", dim=vectors.shape[1])
            h.init_index(max_elements=scale, ef_construction=100, M=16)
            h.set_num_threads(1)
            t0 = time.perf_counter()
            h.add_items(vectors, np.arange(scale))
            build = time.perf_counter() - t0
            h.set_ef(64)
            lat, hit = [], 0
            for q, truth in zip(queries, exact, strict=True):
                t0 = time.perf_counter()
                labels, _ = h.knn_query(q, k=10)
                lat.append(time.perf_counter() - t0)
                hit += len(set(labels[0].tolist()) & truth)
            rows.append({"scale": scale, "index": "hnswlib M16 ef64", "vectors": kind,
                         "build_s": build, "lat": lat, "recall": hit / (10 * len(queries))})
    largest = max(scales)
    for name, vectors, queries in hard_sets(largest, rng):
        index, build = kernel_index(vectors)
        lat, recall = measure(vectors, queries, top10(index))
        rows.append({"scale": largest, "index": index_kind(largest), "vectors": name,
                     "build_s": build, "lat": lat, "recall": recall, "hard": True})
    lat, recall = measure(vectors, queries, lambda q: np.argpartition(-(vectors @ q), 9)[:10])
    rows.append({"scale": largest, "index": "float32 scan (numpy)", "vectors": "isotropic random",
                 "build_s": 0.0, "lat": lat, "recall": recall, "hard": True})
    return rows


def minilm_end_to_end(minilm: MiniLMEmbedder) -> dict[str, float]:
    corpus = texts(256, seed=5)
    minilm.embed(corpus[:8])  # load
    t0 = time.perf_counter()
    minilm.embed(corpus)
    tput = len(corpus) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kernel.toml"
        config.write_text('[kernel]\nmemory_embedder = "minilm"\n')
        k = KernelProcess(Path(tmp) / "state")
        k.extra_args = ["--config", str(config)]
        k.start()
        try:
            with k.connect(timeout=120) as c:
                c.memory.search("warm up the model", namespace="bench/m")
                adds = []
                for text in corpus[:100]:
                    t0 = time.perf_counter()
                    c.memory.add(text, namespace="bench/m")
                    adds.append(time.perf_counter() - t0)
                lat = []
                for q in texts(50, seed=9):
                    t0 = time.perf_counter()
                    c.memory.search(q, k=10, namespace="bench/m")
                    lat.append(time.perf_counter() - t0)
        finally:
            k.stop()
    return {"embed_per_s": tput, "add_p50": pct(adds, 50), "search_p50": pct(lat, 50),
            "search_p99": pct(lat, 99)}


def p50_ms(fn: Callable[[], object], n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return pct(times, 50) * 1000


def breakdown(scale: int) -> list[tuple[str, float]]:
    import queue
    import threading

    from kernel.db import Database
    from kernel.memory.indexes import IndexThread
    from sdk import abi

    embedder = HashEmbedder()
    corpus = texts(scale)
    vectors = embedder.embed(corpus)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "kernel.db")
        db.conn.executemany(
            "INSERT INTO memories (namespace, content, metadata, size, embedding, embedder, "
            "created_at, updated_at) VALUES ('ns',?,?,1,?,'hash',0,0)",
            ((c, json.dumps({"topic": c.split()[0]}), v.tobytes())
             for c, v in zip(corpus, vectors, strict=True)))
        db.commit()
        query = "travel note: plan trip flight hotel budget"
        rows.append(("embed the query (hashing embedder)",
                     p50_ms(lambda: embedder.embed([query]), 200)))
        q = embedder.embed([query])[0]
        load = p50_ms(lambda: kernel_index(np.frombuffer(b"".join(r[0] for r in db.read(
            "SELECT embedding FROM memories WHERE namespace='ns'")), np.float32)
            .reshape(scale, 384)), 3)
        rows.append(("load the index from SQLite (first search)", load))
        index, _ = kernel_index(vectors)
        rows.append((f"scan ({index_kind(scale)}), k=10", p50_ms(lambda: index.search(q, 20), 200)))
        sql = "SELECT id FROM memories WHERE namespace='ns' AND json_extract(metadata, '$.topic')=?"
        rows.append(("filter {topic: travel}, 1/16: SQL pass over all",
                     p50_ms(lambda: db.read(sql, ("travel",)), 10)))
        threaded = IndexThread(db.path, "hash", lambda: db.commits, lambda fn: fn())
        threaded.start()

        def filtered() -> None:
            done = threading.Event()
            threaded.search("ns", q, "", 20, {"topic": "travel"}, False, lambda _: done.set())
            done.wait()

        rows.append(("  the same filtered search (shortlist checks)", p50_ms(filtered, 50)))
        threaded.stop()
        there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        back: queue.SimpleQueue[int] = queue.SimpleQueue()

        def serve() -> None:
            while (item := there.get()) is not None:
                back.put(item)

        thread = threading.Thread(target=serve)
        thread.start()
        rows.append(("hand-off to a thread and back", p50_ms(lambda: (there.put(1), back.get()),
                                                             1000)))
        there.put(None)
        thread.join()
        ids = [i + 1 for i, _ in index.search(q, 10)]
        rows.append(("read the 10 hits' rows", p50_ms(lambda: [db.read(
            "SELECT content, metadata, created_at, updated_at, size FROM memories WHERE id=? "
            "AND namespace='ns'", (i,)) for i in ids], 200)))
        hits = [abi.MemoryHit(i, "ns", corpus[i - 1], {"topic": "x"}, 0.5, "vector") for i in ids]
        rows.append(("encode the reply", p50_ms(lambda: abi.encode(hits), 200)))
        db.close()
    return rows


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1000,10000,100000")
    p.add_argument("--ops", type=int, default=300, help="timed calls of each kind per scale")
    p.add_argument("--hnsw", type=int, default=0, metavar="N",
                   help="also measure hnswlib (pip install hnswlib) at scales up to N")
    p.add_argument("--parts", default="abcd", help="which parts to run (default abcd)")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    path = models.installed_embedder()
    minilm = MiniLMEmbedder(path, threads=1) if path else None

    print(f"load average at start {loadavg()}")
    e2e = end_to_end(scales, args.ops) if "a" in args.parts else {}
    print("\n(a) end to end through the kernel (hashing embedder), ms p50 / p99")
    print(f"{'memories':>9} | {'add p50   p99':>15} | {'add/s':>6} | {'get p50   p99':>15} | "
          f"{'search p50 p99':>15} | {'search/s':>8} | {'keyword p50 p99':>15} | "
          "first search (kernel's index load)")
    for scale, r in e2e.items():
        print(f"{scale:>9} | {ms(r['add'])} | {r['add_tput'][0]:6.0f} | {ms(r['get'])} | "
              f"{ms(r['search'])} | {r['search_tput'][0]:8.0f} | {ms(r['keyword'])} | "
              f"{r['load'][1] * 1000:.0f} ms ({r['load'][2] * 1000:.0f} ms; "
              f"bulk insert {r['load'][0]:.1f} s)")
    if e2e:
        print(f"load average after (a) {loadavg()}")

    rows = index_only(scales, args.hnsw, minilm) if "b" in args.parts else []
    print("\n(b) the index alone, recall@10 against exact search")
    print(f"{'memories':>9} | {'index':<20} | {'vectors':<28} | {'build':>7} | "
          f"{'p50 ms':>7} | {'p99 ms':>7} | recall@10")
    for row in rows:
        print(f"{row['scale']:>9} | {row['index']:<20} | {row['vectors']:<28} | "
              f"{row['build_s']:6.2f}s | {pct(row['lat'], 50) * 1000:7.3f} | "
              f"{pct(row['lat'], 99) * 1000:7.3f} | {row['recall']:.3f}")

    m = None
    if minilm is not None and "c" in args.parts:
        m = minilm_end_to_end(minilm)
        print(f"\n(c) all-MiniLM-L6-v2 (1 thread): {m['embed_per_s']:.0f} texts/s in batches; "
              f"memory.add p50 {m['add_p50'] * 1000:.1f} ms, memory.search p50 "
              f"{m['search_p50'] * 1000:.1f} ms / p99 {m['search_p99'] * 1000:.1f} ms "
              "(100 memories, query embedded per call)")
    parts = breakdown(max(scales)) if "d" in args.parts else []
    if parts:
        print(f"\n(d) where a search's time goes at {max(scales)} memories (p50, in-process)")
        for name, value in parts:
            print(f"  {name:<50} {value:9.3f} ms")
    if args.json:
        args.json.write_text(json.dumps({"e2e": e2e, "index": rows, "minilm": m,
                                         "breakdown": parts}, default=str))
    largest = max(scales)
    recall = next((r["recall"] for r in rows if r["scale"] == largest
                   and not r.get("hard") and not r["index"].startswith("hnsw")), float("nan"))
    p50 = pct(e2e[largest]["search"], 50) * 1000 if e2e else float("nan")
    print(f"load average at end {loadavg()}")
    print(f"RESULT search_p50_ms={p50:.2f} recall10={recall:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
