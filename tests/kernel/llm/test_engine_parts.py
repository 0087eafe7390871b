"""The engine's parts on their own: text stream, prefix cache, sampler, slot store."""

from __future__ import annotations

import random
import time

import pytest
import torch

from kernel.llm.engine.prefix import PrefixCache
from kernel.llm.engine.sampling import SamplingParams, make_generator, sample
from kernel.llm.engine.slots import HOLD_S, SlotCache
from kernel.llm.engine.text import TextStream
from tests.tinymodel import tiny_tokenizer

TOK = tiny_tokenizer()


def stream(ids: list[int], stop: list[str]) -> tuple[list[str], TextStream]:
    s = TextStream(TOK, stop)
    deltas = []
    for t in ids:
        deltas.append(s.push(t))
        if s.stopped:
            break
    deltas.append(s.finish())
    return deltas, s


def test_text_stream_equals_full_decode_even_across_split_characters() -> None:
    ids = TOK.encode("café → 東京 😀 the agent; naïve über", add_special_tokens=False)
    assert len(ids) > 10
    deltas, _ = stream(ids, [])
    assert "".join(deltas) == TOK.decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # a split character waits to be whole
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, len(TOK)) for _ in range(40)]
        deltas, _ = stream(ids, [])
        assert "".join(deltas) == TOK.decode(ids)


def test_text_stream_holds_back_and_strips_stop_strings() -> None:
    text = "the agent calls a tool and reads the answer"
    ids = TOK.encode(text, add_special_tokens=False)
    deltas, s = stream(ids, ["reads", "zzz"])
    assert s.stopped and "".join(deltas) == "the agent calls a tool and "
    assert not any("rea" in d for d in deltas)
    # A tail that looks like the start of a stop string is held, then released when it is not.
    deltas, s = stream(TOK.encode("the answer", add_special_tokens=False), ["the tool"])
    assert not s.stopped and "".join(deltas) == "the answer"
    assert deltas[0] == ""


def kv(tokens: list[int]) -> torch.Tensor:
    """Fake KV whose values encode the token ids: [layers=1, 2, heads=1, n, dim=1]."""
    return torch.tensor(tokens, dtype=torch.float32).reshape(1, 1, 1, -1, 1).expand(
        1, 2, 1, -1, 1).contiguous()


def cached(cache: PrefixCache, tokens: list[int]) -> list[int]:
    pieces = cache.match(tokens)
    return torch.cat(pieces, dim=3)[0, 0, 0, :, 0].int().tolist() if pieces else []


def test_prefix_cache_matches_splits_and_evicts_lru() -> None:
    cache = PrefixCache(capacity=10)
    cache.insert([1, 2, 3, 4, 5], lambda a, b: kv([1, 2, 3, 4, 5][a:b]))
    assert cached(cache, [1, 2, 3, 9]) == [1, 2, 3]
    cache.insert([1, 2, 3, 7], lambda a, b: kv([1, 2, 3, 7][a:b]))  # splits after 1, 2, 3
    assert cache.tokens == 6
    assert cached(cache, [1, 2, 3, 7, 8]) == [1, 2, 3, 7]
    assert cached(cache, [1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 5]
    assert cached(cache, [2]) == []
    cache.insert([9, 9, 9], lambda a, b: kv([9, 9, 9][a:b]))
    cached(cache, [1, 2, 3, 7])  # now [.., 4, 5] is the least recently used leaf
    cache.insert([8, 8, 8], lambda a, b: kv([8, 8, 8][a:b]))
    assert cache.tokens <= 10
    assert cached(cache, [1, 2, 3, 4, 5]) == [1, 2, 3]
    assert cached(cache, [1, 2, 3, 7]) == [1, 2, 3, 7]
    assert cached(cache, [8, 8, 8]) == [8, 8, 8]
    assert cache.bytes == cache.tokens * 2 * 4


def test_prefix_cache_of_size_zero_copies_nothing() -> None:
    cache = PrefixCache(capacity=0)
    cache.insert([1, 2], lambda a, b: pytest.fail("copied KV it cannot keep"))
    assert cache.match([1, 2]) == [] and cache.tokens == 0


def test_sampler_greedy_topk_topp() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams()
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 0]
    top1 = SamplingParams(temperature=1.0, top_k=1, seed=0)
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=0)
    gens = [make_generator(top1, torch.device("cpu")), make_generator(tiny_p, torch.device("cpu"))]
    for _ in range(20):
        assert sample(logits, [top1, tiny_p], gens) == [1, 0]
    two = SamplingParams(temperature=1.0, top_k=2, seed=3)
    gen = make_generator(two, torch.device("cpu"))
    seen = {sample(logits[:1], [two], [gen])[0] for _ in range(200)}
    assert seen == {1, 3}


def test_slot_store_arrange_and_remove_keep_rows_intact() -> None:
    slots = SlotCache(layers=1, kv_heads=1, head_dim=1, dtype=torch.float32,
                      device=torch.device("cpu"))
    for i in range(6):
        slots.add(i)
        slots.load(i, torch.full((1, 2, 1, 3 + i, 1), float(i)), 0)
    slots.arrange([[5, 1], [3]])
    assert {slots.row(5), slots.row(1)} == {0, 1} and slots.row(3) == 2
    slots.remove(0)
    slots.remove(4)
    for i in (1, 2, 3, 5):
        assert slots.length(i) == 3 + i
        assert torch.equal(slots.read(i, 0, 3 + i), torch.full((1, 2, 1, 3 + i, 1), float(i)))
    for i in (1, 2, 3, 5):
        slots.remove(i)
    assert len(slots) == 0
    slots.trim(now=time.monotonic() + HOLD_S)
    assert slots.reserved_bytes == 0


def test_slot_store_keeps_its_buffer_until_mostly_empty_for_a_while() -> None:
    """Agents in a closed loop empty and refill the store every turn: it must not reallocate
    (fresh pages, faulted in and zeroed) each time, only once it has been mostly empty for
    HOLD_S; then it shrinks (rows to twice those used, columns to twice the longest)."""
    slots = SlotCache(layers=1, kv_heads=1, head_dim=1, dtype=torch.float32,
                      device=torch.device("cpu"))
    for i in range(32):
        slots.add(i)
        slots.load(i, torch.full((1, 2, 1, 600, 1), float(i)), 0)
    buffer, reserved = slots._buf.data_ptr(), slots.reserved_bytes
    for i in range(32):  # a turn ends: every row leaves...
        slots.remove(i)
    for i in range(32, 64):  # ...and the next turn's come back
        slots.add(i)
        slots.load(i, torch.full((1, 2, 1, 600, 1), float(i)), 0)
    assert slots._buf.data_ptr() == buffer and slots.reserved_bytes == reserved
    t0 = time.monotonic()
    for i in range(32, 62):
        slots.remove(i)
    slots.trim(now=t0 + HOLD_S / 2)
    assert slots.reserved_bytes == reserved  # mostly empty, not for long enough
    slots.add(99)  # busy again: the wait starts over
    slots.remove(99)
    slots.trim(now=t0 + HOLD_S)
    assert slots.reserved_bytes == reserved
    slots.trim(now=time.monotonic() + 2 * HOLD_S)
    assert slots._rows == 4 and slots.reserved_bytes < reserved
    for i in (62, 63):
        assert torch.equal(slots.read(i, 0, 600), torch.full((1, 2, 1, 600, 1), float(i)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_masks_give_sdpa_the_sums_of_boolean_masks(dtype: torch.dtype) -> None:
    """The pass builds additive masks once instead of handing SDPA boolean ones per layer:
    the attention must come out bit for bit as it did with the boolean masks."""
    import torch.nn.functional as F

    from kernel.llm.engine.ragged import Chunk, Ragged

    g = torch.Generator().manual_seed(7)
    cols, chunk = [40, 3, 599], Chunk(row=3, start=520, tokens=list(range(80)))
    r = Ragged(0, cols, [1, 2, 3], [chunk], torch.device("cpu"), dtype)
    length = r.decode_len
    sees = torch.arange(length)[None, :] <= torch.tensor(cols)[:, None]
    q, k, v = (torch.randn(3, 2, 3, 64, generator=g).to(dtype),
               *(torch.randn(3, 2, length, 64, generator=g).to(dtype) for _ in range(2)))
    assert r.decode_mask is not None and r.decode_mask.dtype == dtype
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=r.decode_mask),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=sees[:, None, None]))
    keys, queries = torch.arange(600), torch.arange(520, 600)
    causal = (keys[None, :] <= queries[:, None])[None, None]
    q, k, v = (torch.randn(1, 6, 80, 64, generator=g).to(dtype),
               *(torch.randn(1, 2, 600, 64, generator=g).to(dtype) for _ in range(2)))
    assert torch.equal(
        F.scaled_dot_product_attention(q, k, v, attn_mask=r.chunk_masks[0], enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True))


def test_the_prefix_cache_is_sized_in_bytes_from_the_model_config() -> None:
    """`prefix_cache_mb` becomes as many tokens as fit: none at 0 (a repeated prompt is
    computed again), all of it with room (the second call reuses the first's KV)."""
    from kernel.config import ModelConfig
    from kernel.llm.engine import Engine
    from tests.tinymodel import tiny_model

    assert ModelConfig("m").prefix_cache_mb == 2048.0
    assert ModelConfig.parse("m", {"prefix_cache_mb": 64}).prefix_cache_mb == 64
    for bad in (-1, "1024", True, float("inf")):
        with pytest.raises(ValueError, match="prefix_cache_mb"):
            ModelConfig.parse("m", {"prefix_cache_mb": bad})
    tok, model = tiny_tokenizer(), tiny_model(0)
    prompt = list(range(5, 45))
    reused = []
    for budget in (0, 2**20):
        engine = Engine(model, tok, prefix_cache_bytes=budget)
        assert engine.prefix.capacity == budget // engine.slots.token_bytes
        for seq in (1, 2):
            engine.add(seq, prompt, SamplingParams(max_tokens=2, ignore_eos=True))
            while not engine.step([seq])[seq].finished:
                pass
        reused.append(engine.stats()["prefix_tokens_reused"])
    assert reused[0] == 0 and reused[1] >= len(prompt) - 1
