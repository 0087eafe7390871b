"""The memory manager through a real kernel: namespaces, isolation, capabilities, quotas, the
RAM tier's eviction and transparent reload, the worker-thread embedding path, resuming chats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from tests.conftest import KernelProcess, agent, run_calls

CONFIG = """
[kernel]
memory_embedder = "{embedder}"
memory_quota = 20000
memory_ram_quota = 4000
"""


def boot(tmp: Path, embedder: str) -> KernelProcess:
    config = tmp / "kernel.toml"
    config.write_text(CONFIG.format(embedder=embedder))
    k = KernelProcess(tmp / "state")
    k.extra_args = ["--config", str(config)]
    return k.start()


@pytest.fixture(scope="module")
def mk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    k = boot(tmp_path_factory.mktemp("mem"), "hash")
    yield k
    k.stop()


def test_add_get_update_search_delete(mk: KernelProcess) -> None:
    with mk.connect() as c:
        ns = "test/crud"
        cat = c.memory.add("the cat sat on the mat", {"topic": "pets", "n": 1}, namespace=ns)
        tax = c.memory.add("file the quarterly tax report", {"topic": "work"}, namespace=ns)
        assert c.memory.get(cat, namespace=ns).metadata == {"topic": "pets", "n": 1}
        hits = c.memory.search("a cat on a mat", k=1, namespace=ns)
        assert [h.id for h in hits] == [cat] and hits[0].match == "vector"
        assert [h.id for h in c.memory.search("tax", namespace=ns, mode="keyword")] == [tax]
        assert [h.id for h in c.memory.search("cat", namespace=ns,
                                              filter={"topic": "work"})] == [tax]
        c.memory.update(tax, "walk the dog in the park", namespace=ns)
        assert c.memory.get(tax, namespace=ns).metadata == {"topic": "work"}
        assert c.memory.search("dog park", k=1, namespace=ns)[0].id == tax
        assert c.memory.search("tax", namespace=ns, mode="keyword") == []
        assert [m.id for m in c.memory.list(namespace=ns)] == [cat, tax]
        assert [m.id for m in c.memory.list(namespace=ns, after=cat)] == [tax]
        c.memory.delete(cat, namespace=ns)
        with pytest.raises(sdk.NotFound):
            c.memory.get(cat, namespace=ns)
        with pytest.raises(sdk.InvalidArgument):
            c.memory.add("x", namespace="../etc")
        with pytest.raises(sdk.InvalidArgument):
            c.memory.add("x", {"bad": float("nan")}, namespace=ns)


def test_agents_are_isolated(mk: KernelProcess) -> None:
    [added, own] = run_calls(mk, "iso-a", [["memory.add", {"content": "alice's secret plan"}],
                                           ["memory.search", {"query": "secret plan"}]])
    secret = added["ok"]
    assert own["ok"][0]["namespace"] == "agent/iso-a"
    probes = run_calls(mk, "iso-b", [
        ["memory.get", {"id": secret}],                               # guess the id
        ["memory.get", {"id": secret, "namespace": "agent/iso-a"}],
        ["memory.search", {"query": "secret plan"}],
        ["memory.search", {"query": "secret plan", "namespace": "agent/iso-a"}],
        ["memory.list", {"namespace": "agent/iso-a"}],
        ["memory.update", {"id": secret, "content": "x", "namespace": "agent/iso-a"}],
        ["memory.delete", {"id": secret, "namespace": "agent/iso-a"}],
    ])
    assert probes[0]["err"] == "ENOENT"  # indistinguishable from an id that does not exist
    assert probes[2] == {"ok": []}
    assert [p.get("err") for p in probes[1:]] == [
        "EPERM", None, "EPERM", "EPERM", "EPERM", "EPERM"]
    granted = run_calls(mk, "iso-c", [
        ["memory.search", {"query": "secret plan", "namespace": "agent/iso-a"}],
        ["memory.delete", {"id": secret, "namespace": "agent/iso-a"}]],
        caps=("memory.search@mem/agent/iso-a",))
    assert granted[0]["ok"][0]["id"] == secret and granted[1]["err"] == "EPERM"


def test_shared_namespace_by_capability(mk: KernelProcess) -> None:
    cap = ("memory.*@mem/team/x",)
    run_calls(mk, "team-a", [["memory.add", {"content": "meeting moved to friday",
                                             "namespace": "team/x"}]], caps=cap)
    [hits] = run_calls(mk, "team-b", [["memory.search", {"query": "when is the meeting",
                                                         "namespace": "team/x"}]], caps=cap)
    assert hits["ok"][0]["content"] == "meeting moved to friday"
    [refused] = run_calls(mk, "team-c", [["memory.search", {"query": "meeting",
                                                            "namespace": "team/x"}]])
    assert refused["err"] == "EPERM"


def test_quota(mk: KernelProcess) -> None:
    with mk.connect() as c:
        ns = "test/quota"
        for _ in range(9):
            c.memory.add("q" * 2000, namespace=ns)
        with pytest.raises(sdk.QuotaExceeded):
            c.memory.add("q" * 2000, namespace=ns)
        with pytest.raises(sdk.QuotaExceeded):  # a sub-namespace shares its owner's quota
            c.memory.add("q" * 2000, namespace=ns + "/sub")
        first = c.memory.list(namespace=ns, limit=1)[0].id
        c.memory.delete(first, namespace=ns)  # room again
        c.memory.add("q" * 2000, namespace=ns)


def test_ram_tier_evicts_with_lruk_and_reloads(mk: KernelProcess) -> None:
    with mk.connect() as c:
        ns = "test/tier"
        ids = [c.memory.add(f"memory number {i} " + "x" * 300, namespace=ns) for i in range(40)]
        stats = c.sys.stats().memory
        assert stats["evictions"] > 0
        reloads = stats["reloads"]
        for i, memory_id in enumerate(ids):  # every one still there, reloaded on demand
            assert c.memory.get(memory_id, namespace=ns).content.startswith(f"memory number {i} ")
        assert c.sys.stats().memory["reloads"] > reloads
        assert [h.id for h in c.memory.search("memory number 3", k=40, namespace=ns,
                                              mode="keyword")][:1] == [ids[3]]


def test_restarted_agent_resumes_its_conversation(mk: KernelProcess) -> None:
    with mk.connect() as admin:
        for task in ("first", "second"):
            assert admin.proc.wait(admin.proc.spawn(agent("convo"), name="talker", argv=[task]),
                                   timeout=60).exit_status == 0
        info = admin.proc.wait(admin.proc.spawn(agent("convo"), name="talker"), timeout=60)
    assert info.result == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "noted: first"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "noted: second"}]


def test_worker_thread_embedding_and_backfill(tmp_path: Path) -> None:
    """A slow embedder runs on the worker thread (the call parks); memories stored while no
    embedder was configured get their vectors at the next boot."""
    config = tmp_path / "kernel.toml"
    config.write_text('[kernel]\nmemory_embedder = "none"\n')
    k = KernelProcess(tmp_path / "state")
    k.extra_args = ["--config", str(config)]
    k.start()
    with k.connect() as c:
        early = c.memory.add("the old lighthouse keeper", namespace="t/w")
        assert c.memory.search("lighthouse", namespace="t/w")[0].match == "keyword"
    k.stop()
    config.write_text('[kernel]\nmemory_embedder = "hash-slow"\n')
    k.start()
    try:
        with k.connect() as c:
            late = c.memory.add("a new harbour pilot", namespace="t/w")
            hits = c.memory.search("old lighthouse keeper", k=2, namespace="t/w", mode="vector")
            assert hits[0].id == early and {h.id for h in hits} == {early, late}
            assert c.sys.stats().memory["embedded"] >= 2
    finally:
        k.stop()


@pytest.mark.integration
def test_minilm_finds_paraphrases(tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2, on the worker thread: a query that shares no word with its
    answer still finds it."""
    from sdk import models

    if models.installed_embedder() is None:
        pytest.skip("all-MiniLM-L6-v2 is not pulled (agentos mem pull)")
    k = boot(tmp_path, "minilm")
    try:
        with k.connect(timeout=120) as c:
            ns = "t/minilm"
            ids = [c.memory.add(text, namespace=ns) for text in (
                "The puppy is playing fetch in the garden",
                "Quarterly revenue grew by eight percent",
                "Remember to renew the car insurance next month")]
            hits = c.memory.search("a young dog having fun outdoors", k=3, namespace=ns)
            assert hits[0].id == ids[0] and hits[0].match == "vector"
            assert hits[0].score > hits[1].score
            money = c.memory.search("company earnings increased", k=1, namespace=ns)
            assert money[0].id == ids[1]
    finally:
        k.stop()


@pytest.fixture(scope="module")
def embedder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding a random MiniLM-shaped BERT where the real one would be pulled."""
    from tests.tinymodel import tiny_embedder

    root = tmp_path_factory.mktemp("models")
    tiny_embedder(root)
    return root


def test_minilm_embedder_pools_over_the_mask_only(embedder_cache: Path) -> None:
    """The real embedder's code on the fixture: each row of a padded batch equals the same text
    embedded alone (mean over its own tokens, L2-normalised), across sub-batches."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from kernel.memory.embed import MiniLMEmbedder
    from sdk import models

    directory = models.installed_embedder(embedder_cache)
    assert directory is not None
    texts = ["the agent calls a tool", "memory", "", "x " * 400,
             "the kernel manages storage and tools for every agent before it plans"]
    embedder = MiniLMEmbedder(directory)
    embedder.batch = 2  # three sub-batches, each padded to its longest text
    rows = embedder.embed(texts)
    assert rows.shape == (len(texts), 384) and rows.dtype == np.float32
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    for text, row in zip(texts, rows, strict=True):
        ids = tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            alone = model(**ids).last_hidden_state[0].mean(0)
        expected = (alone / alone.norm()).numpy()
        assert np.allclose(row, expected, atol=1e-5), text[:20]
    assert embedder.embed([]).shape == (0, 384)


def test_the_embedder_thread_adds_no_openmp_team(embedder_cache: Path) -> None:
    """An embedding thread that ran torch on all cores would keep an OpenMP team beside the
    LLM's, and libgomp then stops spinning idle workers: every model step pays futex wakes.
    The embedder's thread computes single-threaded: embedding from a new thread that stays
    alive adds that thread to the process and no OpenMP worker with it."""
    import os
    import threading

    import torch

    from kernel.memory.embed import MiniLMEmbedder
    from sdk import models

    if torch.get_num_threads() < 2:
        pytest.skip("one core: torch makes no OpenMP team to leave out")
    directory = models.installed_embedder(embedder_cache)
    assert directory is not None
    embedder = MiniLMEmbedder(directory)
    warm = threading.Thread(target=embedder.embed, args=(["load the model, the tokenizer"] * 64,))
    warm.start()
    warm.join()  # its pools made and, with the thread, ended
    before = set(os.listdir("/proc/self/task"))
    embedded, release = threading.Event(), threading.Event()

    def embed_and_stay() -> None:
        embedder.embed(["the agent calls a tool"] * 64)
        embedded.set()
        release.wait()

    thread = threading.Thread(target=embed_and_stay)
    thread.start()
    try:
        assert embedded.wait(60)
        # Threads may end meanwhile (a neighbour test's); the only new one is the embedder's.
        assert set(os.listdir("/proc/self/task")) - before == {str(thread.native_id)}
    finally:
        release.set()
        thread.join()


def test_kernel_searches_with_the_minilm_embedder(tmp_path: Path, embedder_cache: Path) -> None:
    """`memory_embedder = "minilm"` loads the pulled model from the cache and embeds on the
    worker thread: a stored text is its own nearest neighbour."""
    config = tmp_path / "kernel.toml"
    config.write_text('[kernel]\nmemory_embedder = "minilm"\n')
    k = KernelProcess(tmp_path / "state", env={"AGENTOS_MODEL_DIR": str(embedder_cache)})
    k.extra_args = ["--config", str(config)]
    k.start()
    try:
        with k.connect(timeout=120) as c:
            ns = "t/tiny-minilm"
            texts = ["the agent calls a tool", "memory storage and access",
                     "answer briefly and stop when you are done"]
            ids = [c.memory.add(text, namespace=ns) for text in texts]
            for text, mid in zip(texts, ids, strict=True):
                hits = c.memory.search(text, k=3, namespace=ns, mode="vector")
                assert hits[0].id == mid and hits[0].match == "vector"
                assert hits[0].score > 0.999 and hits[1].score < hits[0].score
            assert c.sys.stats().memory["embedded"] >= 3
        assert "embedder loaded" in k.log() and str(embedder_cache) in k.log()
    finally:
        k.stop()
