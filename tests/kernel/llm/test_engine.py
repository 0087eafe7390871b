"""The batching engine: batched equals alone, chunked prefill, preemption, prefix reuse, cancel."""

from __future__ import annotations

import gc
import os
import random
import time
import weakref
from dataclasses import dataclass, field

import pytest
import torch

from kernel.llm.engine import Engine, SamplingParams
from kernel.llm.engine.slots import HOLD_S
from tests.tinymodel import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
MODEL = tiny_model(0)
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
# Random schedules to try; raise it for a soak run (300 passed when this was written).
CHAOS_RUNS = int(os.environ.get("ENGINE_CHAOS_RUNS", "3"))


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    reason: str | None = None


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(TOK), (n,), generator=g).tolist()


def engine(**kw) -> Engine:
    kw.setdefault("prefix_cache_tokens", 0)
    return Engine(kw.pop("model", MODEL), TOK, **kw)


def alone(p: list[int], params: SamplingParams = GREEDY, **kw) -> Result:
    """The reference: one request in an engine of its own, no prefix cache."""
    return run_all(engine(**kw), {0: (p, params, 0)})[0]


def run_all(e: Engine, requests: dict[int, tuple[list[int], SamplingParams, int]],
            pick: random.Random | None = None, on_step=None) -> dict[int, Result]:
    """Add each request at its join step; step until all finish. With `pick`, each step runs a
    random non-empty subset of the live requests (the others sit idle in their rows)."""
    results = {i: Result() for i in requests}
    live: list[int] = []
    step = 0
    while step == 0 or live or any(j >= step for _, _, j in requests.values()):
        for i, (p, params, join) in requests.items():
            if join == step:
                e.add(i, p, params)
                live.append(i)
        run = live
        if pick is not None and len(live) > 1:
            run = pick.sample(live, pick.randint(1, len(live)))
        if run:
            out = e.step(sorted(run))
            assert set(out) == set(run)
            for i, o in out.items():
                results[i].tokens += o.new_tokens
                results[i].text += o.text_delta
                if o.finished:
                    results[i].reason = o.finish_reason
                    live.remove(i)
        if on_step:
            on_step(e, step, live)
        step += 1
    return results


MIX = {  # id: (prompt, params, join step): lengths around the 32-token chunk, joining late
    0: (prompt(1, 1), SamplingParams(max_tokens=30, ignore_eos=True), 0),
    1: (prompt(7, 2), SamplingParams(max_tokens=12, ignore_eos=True), 0),
    2: (prompt(33, 3), SamplingParams(max_tokens=20, ignore_eos=True), 2),
    3: (prompt(90, 4), SamplingParams(max_tokens=25, ignore_eos=True), 3),
    4: (prompt(250, 5), SamplingParams(max_tokens=9, ignore_eos=True), 3),
    5: (prompt(64, 6), SamplingParams(max_tokens=16, ignore_eos=True), 11),
}


@pytest.fixture(scope="module")
def mix_alone() -> dict[int, Result]:
    return {i: alone(p, params, prefill_chunk=32) for i, (p, params, _) in MIX.items()}


def test_alone_matches_transformers_generate() -> None:
    for n, seed in ((1, 1), (40, 2), (100, 3)):
        p = prompt(n, seed)
        ids = MODEL.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, n:].tolist()
        assert alone(p).tokens == ids
        assert alone(p, prefill_chunk=16).tokens == ids


def test_batched_equals_alone(mix_alone) -> None:
    batched = run_all(engine(prefill_chunk=32), MIX)
    for i in MIX:
        assert batched[i].tokens == mix_alone[i].tokens, i
        assert batched[i].text == mix_alone[i].text
        assert batched[i].reason == "length"
        assert len(batched[i].tokens) == MIX[i][1].max_tokens


def test_batched_equals_alone_when_scheduler_runs_subsets(mix_alone) -> None:
    batched = run_all(engine(prefill_chunk=32), MIX, pick=random.Random(7))
    assert {i: r.tokens for i, r in batched.items()} == {i: r.tokens for i, r in mix_alone.items()}


def test_batched_equals_alone_with_prefix_cache(mix_alone) -> None:
    shared = prompt(40, 99)
    requests = {i: (shared + p, params, j) for i, (p, params, j) in MIX.items()}
    ref = {i: alone(p, params, prefill_chunk=32) for i, (p, params, _) in requests.items()}
    e = engine(prefill_chunk=32, prefix_cache_tokens=4096)
    batched = run_all(e, requests)
    assert {i: r.tokens for i, r in batched.items()} == {i: r.tokens for i, r in ref.items()}
    assert e.stats()["prefix_tokens_reused"] > 0


def test_chunked_prefill_keeps_others_decoding() -> None:
    short = {i: (prompt(5 + i, 10 + i), SamplingParams(max_tokens=40, ignore_eos=True), 0)
             for i in range(3)}
    long_prompt = prompt(700, 20)
    requests = {**short, 9: (long_prompt, SamplingParams(max_tokens=8, ignore_eos=True), 3)}
    e = engine(prefill_chunk=64)
    per_step: dict[int, dict[int, int]] = {}
    results = {i: Result() for i in requests}
    for step in range(60):
        for i, (p, params, join) in requests.items():
            if join == step:
                e.add(i, p, params)
        run = [i for i in requests if requests[i][2] <= step and results[i].reason is None]
        if not run:
            break
        out = e.step(run)
        per_step[step] = {i: len(o.new_tokens) for i, o in out.items()}
        for i, o in out.items():
            results[i].tokens += o.new_tokens
            if o.finished:
                results[i].reason = o.finish_reason
    chunks = -(-len(long_prompt) // 64)
    for step in range(3, 3 + chunks):
        assert all(per_step[step][i] == 1 for i in short), step  # nobody waits for the prompt
        assert per_step[step][9] == (1 if step == 3 + chunks - 1 else 0)
    assert results[9].tokens == alone(long_prompt, requests[9][1], prefill_chunk=64).tokens
    for i, (p, params, _) in short.items():
        assert results[i].tokens == alone(p, params).tokens


@pytest.mark.parametrize("keep_kv,cache", [(True, 0), (False, 0), (False, 4096)])
def test_preempt_resume_is_exact(keep_kv: bool, cache: int) -> None:
    """Switched out and back in at random steps (mid-prefill too), a request still produces
    the tokens of an uninterrupted run, greedy or seeded."""
    rng = random.Random(f"{keep_kv}{cache}")
    target = prompt(150, 30)
    others = {i: (prompt(10 * i + 3, 40 + i), SamplingParams(max_tokens=30, ignore_eos=True))
              for i in range(1, 4)}
    for params in (GREEDY, SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=5,
                                          max_tokens=24, ignore_eos=True)):
        e = engine(prefill_chunk=32, prefix_cache_tokens=cache)
        for i, (p, sp) in {0: (target, params), **others}.items():
            e.add(i, p, sp)
        got: dict[int, list[int]] = {i: [] for i in [0, *others]}
        live, out, preemptions = set(got), False, 0
        while live:
            if 0 in live and rng.random() < 0.3:
                if not out:
                    e.preempt(0, keep_kv=keep_kv)
                    preemptions += 1
                out = not out
            run = sorted(i for i in live if not (i == 0 and out))
            if not run:
                out = False
                continue
            for i, o in e.step(run).items():
                got[i] += o.new_tokens
                if o.finished:
                    live.discard(i)
        assert preemptions >= 4
        assert got[0] == alone(target, params).tokens
        for i, (p, sp) in others.items():
            assert got[i] == alone(p, sp).tokens


@pytest.mark.parametrize("seed", range(CHAOS_RUNS))
def test_random_schedules_change_nothing(seed: int) -> None:
    """Random joins, subsets, preemptions (both kinds), cancels and a prefix cache small enough
    to evict: every request that finishes has exactly the tokens it has alone."""
    rng = random.Random(seed)
    system = prompt(40, 600 + seed)
    requests = {}
    for i in range(10):
        p = (system if rng.random() < 0.6 else []) + prompt(rng.randint(1, 80), 610 + 10 * seed + i)
        sp = (GREEDY if rng.random() < 0.5 else
              SamplingParams(temperature=1.0, top_k=20, seed=i, max_tokens=20, ignore_eos=True))
        requests[i] = (p, sp)
    e = engine(prefill_chunk=16, prefix_cache_tokens=150, max_batch=6)
    got: dict[int, list[int]] = {i: [] for i in requests}
    waiting, live, finished, cancelled = list(requests), [], set(), set()
    for _ in range(400):
        if waiting and rng.random() < 0.3:
            i = waiting.pop(0)
            e.add(i, *requests[i])
            live.append(i)
        if live and rng.random() < 0.15:
            e.preempt(rng.choice(live), keep_kv=rng.random() < 0.5)
        if live and rng.random() < 0.02:
            i = rng.choice(live)
            e.cancel(i)
            live.remove(i)
            cancelled.add(i)
        run = rng.sample(live, min(len(live), rng.randint(1, 6)))
        if run:
            for i, o in e.step(run).items():
                got[i] += o.new_tokens
                if o.finished:
                    live.remove(i)
                    finished.add(i)
        assert e.stats()["prefix_cache_tokens"] <= 150
        if not waiting and not live:
            break
    assert finished | cancelled == set(requests) and len(finished) >= 3
    for i in finished:
        assert got[i] == alone(*requests[i]).tokens, i
    s = e.stats()
    assert s["sequences"] == s["kv_slot_bytes"] == s["kv_snapshot_bytes"] == 0
    e.idle(now=time.monotonic() + HOLD_S)  # the store keeps its buffer a while, then not
    assert e.stats()["kv_reserved_bytes"] == 0


def test_preempt_during_prefill_and_convert_snapshot_to_recompute() -> None:
    target = prompt(200, 50)
    e = engine(prefill_chunk=32)
    e.add(0, target, GREEDY)
    e.step([0])
    e.preempt(0, keep_kv=True)
    assert e.stats()["kv_snapshot_bytes"] == 32 * e.slots.token_bytes
    e.preempt(0, keep_kv=False)  # the snapshot goes too: resume recomputes
    assert e.stats()["kv_snapshot_bytes"] == 0 and e.stats()["preempted"] == 1
    tokens: list[int] = []
    while True:
        o = e.step([0])[0]
        tokens += o.new_tokens
        if o.finished:
            break
    assert tokens == alone(target).tokens


def test_seeded_sampling_same_batched_and_alone() -> None:
    requests = {i: (prompt(8 + 13 * i, 60 + i),
                    SamplingParams(temperature=0.7 + 0.2 * i, top_p=0.9, top_k=50 * i,
                                   seed=100 + i, max_tokens=20, ignore_eos=True), i)
                for i in range(4)}
    batched = run_all(engine(prefill_chunk=32), requests)
    for i, (p, params, _) in requests.items():
        assert batched[i].tokens == alone(p, params).tokens
    again = alone(requests[0][0], SamplingParams(temperature=0.9, seed=100, max_tokens=20))
    other = alone(requests[0][0], SamplingParams(temperature=0.9, seed=101, max_tokens=20))
    assert again.tokens != other.tokens  # the seed matters


def test_max_tokens_and_eos() -> None:
    p = prompt(12, 70)
    free = alone(p, SamplingParams(max_tokens=20, ignore_eos=True))
    assert free.reason == "length" and len(free.tokens) == 20
    model = tiny_model(0)
    eos = free.tokens[6]  # make a token the model is known to produce its end of sequence
    model.generation_config.eos_token_id = [TOK.eos_token_id, eos]
    stopped = alone(p, SamplingParams(max_tokens=20), model=model)
    first = free.tokens.index(eos)
    assert stopped.tokens == free.tokens[:first + 1]
    assert stopped.reason == "stop"
    ignored = alone(p, SamplingParams(max_tokens=20, ignore_eos=True), model=model)
    assert ignored.tokens == free.tokens


def test_stop_strings_are_stripped() -> None:
    p = prompt(30, 80)
    free = alone(p, SamplingParams(max_tokens=40, ignore_eos=True))
    assert free.text == TOK.decode(free.tokens, skip_special_tokens=True)
    text = free.text
    stop = next(text[k:k + 3] for k in range(8, len(text) - 3)
                if "\ufffd" not in text[k:k + 3] and text[k:k + 3].strip())
    cut = text.find(stop)
    got = alone(p, SamplingParams(max_tokens=40, ignore_eos=True, stop=["never there", stop]))
    assert got.reason == "stop"
    assert got.text == text[:cut]
    assert free.tokens[:len(got.tokens)] == got.tokens
    assert stop in TOK.decode(got.tokens)  # it stopped on the token that completed the string


class EvenTokens:
    """A token constraint for the test: only even ids, and the output is whole after five."""

    error = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.seen: list[int] = []

    @property
    def complete(self) -> bool:
        return len(self.seen) == 5

    def fill(self, row: torch.Tensor) -> None:
        row.fill_(0x55555555)  # bits 0, 2, 4, ...: the even ids

    def advance(self, token: int) -> None:
        self.seen.append(token)


def test_constraint_picks_tokens_and_ends_the_output() -> None:
    constraint = EvenTokens(len(TOK))
    params = SamplingParams(max_tokens=20, constraint=constraint)
    e = engine(prefill_chunk=16)
    e.add(0, prompt(40, 700), params)
    e.add(1, prompt(9, 701), GREEDY)
    tokens, reason, live = [], None, {0, 1}
    for step in range(40):
        if step == 5:  # the constraint's state travels with the request
            e.preempt(0, keep_kv=False)
        for i, o in e.step(sorted(live)).items():
            if o.finished:
                live.discard(i)
            if i == 0:
                tokens += o.new_tokens
                reason = o.finish_reason
        if 0 not in live:
            break
    assert reason == "stop" and tokens == constraint.seen
    assert len(tokens) == 5 and all(t % 2 == 0 for t in tokens)


def test_step_output_reports_prefill_progress_and_reuse() -> None:
    system = prompt(50, 710)
    e = engine(prefill_chunk=32, prefix_cache_tokens=4096)
    run_all(e, {0: (system + prompt(5, 711), GREEDY, 0)})
    e.add(1, system + prompt(100, 712), GREEDY)
    progress = []
    for _ in range(4):
        o = e.step([1])[1]
        progress.append((o.computed, o.reused, len(o.new_tokens)))
    assert progress == [(82, 50, 0), (114, 50, 0), (146, 50, 0), (150, 50, 1)]


def test_prefix_reuse_across_turns() -> None:
    system = prompt(80, 90)
    e = engine(prefix_cache_tokens=4096)
    first = run_all(e, {0: (system + prompt(20, 91), GREEDY, 0)})[0]
    assert e.stats()["prefix_tokens_reused"] == 0
    second_prompt = system + prompt(25, 92)
    second = run_all(e, {1: (second_prompt, GREEDY, 0)})[1]
    assert e.stats()["prefix_tokens_reused"] == 80
    assert second.tokens == alone(second_prompt).tokens
    # The next turn of the first conversation: its prompt and output (but the last token,
    # whose KV was never computed) are cached.
    turn = system + prompt(20, 91) + first.tokens + prompt(10, 93)
    before = e.stats()["prefix_tokens_reused"]
    third = run_all(e, {2: (turn, GREEDY, 0)})[2]
    assert e.stats()["prefix_tokens_reused"] - before == 80 + 20 + len(first.tokens) - 1
    assert third.tokens == alone(turn).tokens
    s = e.stats()
    assert s["prefix_hits"] == 2 and s["prefix_lookups"] == 3
    assert 0 < s["prefix_hit_rate"] < 1


def test_requests_admitted_together_share_their_prefill() -> None:
    system = prompt(120, 95)
    requests = {i: (system + prompt(10, 96 + i), GREEDY, 0) for i in range(4)}
    e = engine(prefix_cache_tokens=4096)
    got = run_all(e, requests)
    s = e.stats()
    assert s["prefix_tokens_reused"] == 3 * 120  # one computed the system prompt, three reused
    assert s["prefill_tokens"] == 4 * 130 - 3 * 120
    for i, (p, params, _) in requests.items():
        assert got[i].tokens == alone(p, params).tokens


def test_long_shared_prompt_is_computed_once_across_chunks() -> None:
    system = prompt(200, 97)
    requests = {i: (system + prompt(10, 98 + i), GREEDY, 0) for i in range(4)}
    e = engine(prefix_cache_tokens=4096, prefill_chunk=32)
    got = run_all(e, requests)
    s = e.stats()
    # Each step one request computes a chunk of the system prompt and the others copy it (twice
    # per step); from column 192 the next 16 tokens differ, so each computes its last 18.
    assert s["prefix_tokens_reused"] == 3 * 192
    assert s["prefill_tokens"] == 210 + 3 * 18
    for i, (p, params, _) in requests.items():
        assert got[i].tokens == alone(p, params).tokens


def test_prefix_cache_eviction_bounded() -> None:
    e = engine(prefix_cache_tokens=100)
    for i in range(5):
        run_all(e, {i: (prompt(60, 200 + i), GREEDY, 0)})
        assert e.stats()["prefix_cache_tokens"] <= 100
    assert e.stats()["prefix_cache_bytes"] <= 100 * e.slots.token_bytes


def test_cancel_frees_memory() -> None:
    e = engine(prefill_chunk=32)
    for i in range(3):
        e.add(i, prompt(40 + 10 * i, 300 + i), GREEDY)
    for _ in range(4):
        e.step([0, 1, 2])
    per_token = e.slots.token_bytes
    s = e.stats()
    assert s["kv_slot_bytes"] == sum(e.slots.length(i) for i in range(3)) * per_token > 0
    held = e.slots.length(1)
    e.cancel(1)
    assert e.stats()["kv_slot_bytes"] == s["kv_slot_bytes"] - held * per_token
    e.preempt(2, keep_kv=True)
    snapshot = weakref.ref(e._seqs[2].snapshot)
    assert e.stats()["kv_snapshot_bytes"] > 0
    e.cancel(2)
    gc.collect()
    assert snapshot() is None and e.stats()["kv_snapshot_bytes"] == 0
    e.cancel(0)
    e.idle(now=time.monotonic() + HOLD_S)
    s = e.stats()
    assert s["kv_bytes"] == s["kv_reserved_bytes"] == 0 and s["sequences"] == 0
    e.cancel(0)  # already gone: ignored
    with pytest.raises(KeyError):
        e.step([0])


def test_stats_counts() -> None:
    e = engine()
    e.add(0, prompt(5, 400), GREEDY)
    e.add(1, prompt(5, 401), GREEDY)
    assert e.stats()["queued"] == 2
    e.step([0])
    e.preempt(0)
    s = e.stats()
    assert (s["running"], s["preempted"], s["queued"]) == (0, 1, 1)
    assert s["steps"] == 1 and s["tokens_generated"] == 1


def test_bad_requests_are_refused() -> None:
    e = engine(max_batch=2)
    e.add(0, [5, 6], GREEDY)
    with pytest.raises(ValueError):
        e.add(0, [5], GREEDY)
    with pytest.raises(ValueError):
        e.add(1, [], GREEDY)
    with pytest.raises(ValueError):
        e.add(1, [len(TOK) + 5], GREEDY)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    e.add(1, [5], GREEDY)
    e.add(2, [7], GREEDY)
    with pytest.raises(ValueError):
        e.step([0, 1, 2])  # more than max_batch
    with pytest.raises(ValueError):
        e.step([0, 0])
    with pytest.raises(KeyError):
        e.step([42])


def test_bfloat16_and_eager_attention() -> None:
    p = prompt(30, 500)
    eager = tiny_model(0)
    eager.set_attn_implementation("eager")
    assert alone(p, model=eager).tokens == alone(p).tokens
    e = engine(model=tiny_model(0), dtype=torch.bfloat16)
    got = run_all(e, {i: (prompt(10 + i, 510 + i), GREEDY, i) for i in range(3)})
    assert all(len(r.tokens) == GREEDY.max_tokens for r in got.values())
    assert e.slots.dtype == torch.bfloat16


def test_a_step_is_one_forward_pass_over_decoders_and_prefills() -> None:
    """Decoders, a new prompt and a chunked prefill in progress share one ragged pass, and each
    still gets the tokens it would get alone; the model's own attention is left as it was."""
    requests = {0: (prompt(6, 600), GREEDY, 0), 1: (prompt(9, 601), GREEDY, 0),
                2: (prompt(70, 602), GREEDY, 2), 3: (prompt(20, 603), GREEDY, 3)}
    e = engine(prefill_chunk=32)
    forwards = []
    got = run_all(e, requests, on_step=lambda e, step, live: forwards.append(
        e.stats()["forwards"]))
    assert forwards == list(range(1, len(forwards) + 1))  # exactly one pass per step
    for i, (p, params, _) in requests.items():
        assert got[i].tokens == alone(p, params, prefill_chunk=32).tokens, i
    assert MODEL.config._attn_implementation == "sdpa"


def test_ragged_pass_logits_match_each_row_alone() -> None:
    """The runner's packed pass against plain forwards of each sequence on its own."""
    e = engine()
    rows = {0: prompt(12, 610), 1: prompt(30, 611), 2: prompt(5, 612)}
    for i, p in rows.items():
        e.add(i, p, GREEDY)
    e.step([0, 1, 2])  # prefilled: each now decodes one token per step
    tail = prompt(9, 613)
    e.add(3, tail, GREEDY)
    decoders = sorted(rows, key=e.slots.row)
    e.slots.add(3)
    from kernel.llm.engine.ragged import Chunk

    seqs = [e._seqs[i] for i in decoders]
    with torch.no_grad():
        logits = e.runner.forward(0, [s.computed for s in seqs],
                                  [s.tokens[s.computed] for s in seqs],
                                  [Chunk(e.slots.row(3), 0, tail)])
        for s, row in zip(seqs, logits, strict=False):
            ref = MODEL(torch.tensor([s.tokens])).logits[0, -1]
            torch.testing.assert_close(row, ref, atol=2e-4, rtol=0)
        ref = MODEL(torch.tensor([tail])).logits[0, -1]
        torch.testing.assert_close(logits[-1], ref, atol=2e-4, rtol=0)


def test_shared_prefixes_with_divergent_continuations() -> None:
    """Requests share a system prompt and then diverge at different depths (a tree of
    prefixes), joining at different steps: every one equals its run alone and reuse counts
    only what was really cached."""
    system = prompt(50, 620)
    branch = prompt(30, 621)
    requests = {0: (system + branch + prompt(8, 622), GREEDY, 0),
                1: (system + branch + prompt(8, 623), GREEDY, 0),
                2: (system + prompt(12, 624), GREEDY, 0),
                3: (system + branch[:10] + prompt(20, 625), GREEDY, 3),
                4: (system[:20], GREEDY, 5)}
    e = engine(prefix_cache_tokens=4096, prefill_chunk=32)
    got = run_all(e, requests)
    for i, (p, params, _) in requests.items():
        assert got[i].tokens == alone(p, params).tokens, i
    assert e.stats()["prefix_tokens_reused"] >= 50 + 50 + 60 + 19


def test_preempt_mid_chunked_prefill_while_others_decode() -> None:
    for keep_kv in (True, False):
        target = prompt(150, 630)
        others = {i: prompt(6 + i, 631 + i) for i in (1, 2)}
        e = engine(prefill_chunk=32)
        e.add(0, target, GREEDY)
        for i, p in others.items():
            e.add(i, p, GREEDY)
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for step in range(80):
            run = [i for i in got if i in e._seqs]
            if step in (2, 3):  # two chunks in: switched out for two steps
                run = [i for i in run if i != 0]
                if step == 2:
                    e.preempt(0, keep_kv=keep_kv)
            if not run:
                break
            for i, o in e.step(run).items():
                got[i] += o.new_tokens
        assert got[0] == alone(target).tokens
        for i, p in others.items():
            assert got[i] == alone(p).tokens


def test_prefills_beyond_the_token_cap_run_in_more_passes(monkeypatch) -> None:
    import kernel.llm.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_FORWARD_TOKENS", 40)
    requests = {i: (prompt(30, 640 + i), GREEDY, 0) for i in range(3)}
    e = engine()
    got = run_all(e, requests)
    assert e.stats()["forwards"] == e.stats()["steps"] + 2  # the first step took three passes
    for i, (p, params, _) in requests.items():
        assert got[i].tokens == alone(p, params).tokens
