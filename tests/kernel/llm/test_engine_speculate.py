"""Speculative decoding by prompt lookup: greedy output token for token that of the plain engine,
whatever gets accepted, rejected, cut by max_tokens or a stop string, or preempted."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.config import ModelConfig
from kernel.llm.engine import Engine, SamplingParams
from kernel.llm.engine.speculate import accept, propose
from tests.conftest import DEEP
from tests.tinymodel import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
# A small weight scale makes the random model fall into loops, so lookups find drafts that it
# then accepts (about one in four tokens drafted); the default scale accepts almost none.
MODEL = tiny_model(0, std=0.1)


def repetitive(rng: random.Random, pieces: int = 4) -> list[int]:
    """A prompt that quotes pieces of one segment with noise between them, as agents quote
    tool results."""
    segment = [rng.randrange(3, len(TOK)) for _ in range(rng.randint(2, 12))]
    p: list[int] = []
    for _ in range(rng.randint(1, pieces)):
        p += segment[:rng.randint(1, len(segment))]
        p += [rng.randrange(3, len(TOK)) for _ in range(rng.randint(0, 5))]
    return p


def run(requests: dict[int, tuple[list[int], SamplingParams]], speculate: int,
        preempt: random.Random | None = None, **kw) -> tuple[dict, dict, Engine]:
    """Step all requests to the end; with `preempt`, request 0 is switched out (either way) and
    back in at random steps. Returns each request's (tokens, text, reason), the tokens each
    step gave each request, and the engine."""
    kw.setdefault("prefix_cache_tokens", 0)
    e = Engine(MODEL, TOK, speculate_max_batch=speculate, **kw)
    for i, (p, params) in requests.items():
        e.add(i, p, params)
    got = {i: ([], "", None) for i in requests}
    steps: dict[int, list[list[int]]] = {i: [] for i in requests}
    live, out = set(requests), False
    for _ in range(1000):
        if not live:
            break
        if preempt is not None and 0 in live and preempt.random() < 0.3:
            if not out:
                e.preempt(0, keep_kv=preempt.random() < 0.5)
            out = not out
        run_ids = sorted(i for i in live if not (i == 0 and out)) or sorted(live)
        out = out and run_ids != sorted(live)
        for i, o in e.step(run_ids).items():
            tokens, text, _ = got[i]
            got[i] = (tokens + o.new_tokens, text + o.text_delta, o.finish_reason)
            steps[i].append(o.new_tokens)
            if o.finished:
                live.discard(i)
    assert not live, "the requests did not finish"
    return got, steps, e


class AnyToken:
    """A token constraint that allows every token and never completes: greedy output as
    without it, but a constrained row."""

    error = None
    complete = False

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def fill(self, row: torch.Tensor) -> None:
        row.fill_(-1)

    def advance(self, token: int) -> None:
        pass


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


REQUESTS = {i: (repetitive(random.Random(i)), greedy(60)) for i in range(4)}


def test_propose_takes_the_latest_longest_match() -> None:
    assert propose([1, 2, 3, 9, 1, 2, 3, 8, 7, 2, 3], 3) == [8, 7, 2]  # "2 3", latest: at 5
    assert propose([5, 1, 2, 3, 4, 0, 1, 2, 3], 2) == [4, 0]  # "1 2 3" beats the later "3"
    assert propose([1, 2, 1], 5) == [2, 1]  # the draft may run into the suffix itself
    assert propose([1, 2, 3], 4) == [] and propose([7], 4) == [] and propose([1, 1], 0) == []
    assert propose([4, 4, 4, 4], 2) == [4]  # "4 4 4" at 0 is followed by one token only


def test_accept_keeps_the_agreeing_prefix_and_the_models_next_token() -> None:
    assert accept([5, 6, 7], [5, 6, 9, 1]) == [5, 6, 9]
    assert accept([5, 6, 7], [5, 6, 7, 1]) == [5, 6, 7, 1]
    assert accept([5, 6, 7], [4, 6, 7, 1]) == [4]


def test_speculation_is_token_identical_and_saves_steps() -> None:
    plain, plain_steps, _ = run(REQUESTS, 0)
    spec, spec_steps, e = run(REQUESTS, 8)
    assert spec == plain
    s = e.stats()
    # Drafts were both accepted and rejected, and accepted runs came out as one step's tokens.
    assert 0 < s["spec_accepted"] < s["spec_drafted"]
    assert any(len(t) > 1 for steps in spec_steps.values() for t in steps)
    assert s["steps"] < max(len(v) for v in plain_steps.values())
    assert s["tokens_generated"] == sum(len(t) for t, _, _ in plain.values())


def test_max_tokens_and_stop_strings_cut_inside_an_accepted_run() -> None:
    _, steps, _ = run(REQUESTS, 8)
    # A request and a step that gave several tokens; cut after each but its last one.
    i, at = next((i, k) for i, s in steps.items() for k, t in enumerate(s) if len(t) > 2)
    before = sum(len(t) for t in steps[i][:at])
    prompt = REQUESTS[i][0]
    full_tokens = [t for step in steps[i] for t in step]
    for n in range(before + 1, before + len(steps[i][at])):
        plain, _, _ = run({0: (prompt, greedy(n))}, 0)
        spec, _, _ = run({0: (prompt, greedy(n))}, 8)
        assert spec == plain and len(spec[0][0]) == n and spec[0][2] == "length"
    # A stop string: the text of a token in the middle of that run (and whatever follows it).
    mid = before + 1
    text = TOK.decode(full_tokens[:mid + 1], skip_special_tokens=True)
    stop = text[len(TOK.decode(full_tokens[:mid], skip_special_tokens=True)):]
    if stop.strip():
        plain, _, _ = run({0: (prompt, greedy(60, stop=[stop]))}, 0)
        spec, _, _ = run({0: (prompt, greedy(60, stop=[stop]))}, 8)
        assert spec == plain and spec[0][2] == "stop"


def test_preempted_speculating_sequence_resumes_token_identically() -> None:
    plain, _, _ = run(REQUESTS, 0)
    for seed, cache in ((1, 0), (2, 4096), (3, 0)):
        spec, _, e = run(REQUESTS, 8, preempt=random.Random(seed), prefix_cache_tokens=cache,
                         prefill_chunk=8)
        assert spec == plain
        assert e.stats()["preemptions"] >= 2 and e.stats()["spec_accepted"] > 0


def test_sampled_constrained_and_large_batches_never_speculate() -> None:
    p = repetitive(random.Random(9))
    sampled = {0: (p, SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True))}
    assert run(sampled, 8)[2].stats()["spec_rows"] == 0
    assert run(sampled, 8)[0] == run(sampled, 0)[0]
    constrained = {0: (p, greedy(30, constraint=AnyToken(len(TOK))))}
    assert run(constrained, 8)[2].stats()["spec_rows"] == 0
    assert run(constrained, 8)[0] == run({0: (p, greedy(30))}, 8)[0]
    # Four decoding rows over a threshold of three: no step speculates.
    assert run(REQUESTS, 3)[2].stats()["spec_rows"] == 0
    assert run(REQUESTS, 4)[2].stats()["spec_rows"] > 0


@settings(max_examples=8 * DEEP, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(1, 4), st.integers(1, 6))
def test_random_repetitive_prompts_are_token_identical(rng: random.Random, n: int,
                                                       k: int) -> None:
    requests = {i: (repetitive(rng), greedy(rng.randint(1, 50))) for i in range(n)}
    plain, _, _ = run(requests, 0)
    spec, _, _ = run(requests, 4, speculate_tokens=k, prefill_chunk=rng.choice([4, 256]))
    assert spec == plain


def test_the_config_key_is_off_by_default_and_checked() -> None:
    assert ModelConfig("m").speculate_max_batch == 0
    assert ModelConfig.parse("m", {"speculate_max_batch": 4}).speculate_max_batch == 4
    for bad in (-1, 1.5, "4"):
        with pytest.raises(ValueError, match="speculate_max_batch"):
            ModelConfig.parse("m", {"speculate_max_batch": bad})
    with pytest.raises(ValueError, match="speculate"):
        Engine(MODEL, TOK, speculate_max_batch=-1)


def test_rows_named_one_token_never_speculate() -> None:
    e = Engine(MODEL, TOK, prefix_cache_tokens=0, speculate_max_batch=8)
    for i, (p, params) in REQUESTS.items():
        e.add(i, p, params)
    got: dict[int, list[int]] = {i: [] for i in REQUESTS}
    while len(got[0]) < 60:
        for i, o in e.step(sorted(i for i in REQUESTS if len(got[i]) < 60),
                           one_token={0}).items():
            assert i != 0 or len(o.new_tokens) <= 1
            got[i] += o.new_tokens
    assert got[0] == run(REQUESTS, 0)[0][0][0]
    assert e.stats()["spec_accepted"] > 0  # the others did speculate
