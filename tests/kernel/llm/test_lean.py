"""The lean Llama pass (kernel/llm/engine/lean.py) against transformers' forward: the same
logits bit for bit, pass by pass, for decode rows, prefill chunks and speculative verify
chunks; models it cannot run exactly go through transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from kernel.llm.engine import Engine, SamplingParams
from kernel.llm.engine import lean as lean_pass
from kernel.llm.engine import packed as packing
from tests.tinymodel import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


def passes(model: torch.nn.Module, lean: bool, speculate: int = 0) -> tuple[list, dict]:
    """Every pass's logits and each sequence's tokens, for a mix that makes decode rows,
    chunked prefills (prompts longer than the chunk) and, speculating, verify chunks."""
    engine = Engine(model, TOK, max_batch=8, prefill_chunk=16, prefix_cache_tokens=0,
                    speculate_max_batch=speculate, lean=lean)
    assert (engine.runner.lean is not None) is lean
    seen: list[torch.Tensor] = []
    forward = engine.runner.forward

    def record(*args):
        out = forward(*args)
        seen.append(out.clone())
        return out

    engine.runner.forward = record
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, len(TOK), (n,), generator=g).tolist() for n in (3, 45, 20)]
    prompts.append([7, 8, 9, 10] * 12)  # repeats: prompt lookup drafts from it
    out: dict[int, list[int]] = {}
    running = []
    for i, ids in enumerate(prompts):
        engine.add(i, ids, SamplingParams(max_tokens=12, ignore_eos=True))
        out[i] = []
        running.append(i)
        for j, step in engine.step(running).items():  # arrivals join a running batch
            out[j] += step.new_tokens
    while running:
        for j, step in engine.step(running).items():
            out[j] += step.new_tokens
            if step.finished:
                running.remove(j)
    assert engine.stats()["spec_drafted"] > 0 if speculate else True  # verify chunks ran
    return seen, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("speculate", [0, 8])
def test_the_lean_pass_gives_transformers_logits_bit_for_bit(dtype: torch.dtype,
                                                             speculate: int) -> None:
    model = tiny_model(0).to(dtype)
    hf_logits, hf_tokens = passes(model, lean=False, speculate=speculate)
    lean_logits, lean_tokens = passes(model, lean=True, speculate=speculate)
    assert len(lean_logits) == len(hf_logits) > 10
    assert all(torch.equal(a, b) for a, b in zip(lean_logits, hf_logits, strict=True))
    assert lean_tokens == hf_tokens


@pytest.mark.skipif(not packing.available(), reason="torch built without oneDNN")
def test_the_lean_pass_over_fused_packed_layers_as_the_kernel_loads_them() -> None:
    plain = tiny_model(1).to(torch.bfloat16)
    model = copy.deepcopy(plain)
    assert packing.fuse_projections(model) and packing.pack_linears(model)
    hf_logits, hf_tokens = passes(plain, lean=False)
    lean_logits, lean_tokens = passes(model, lean=True)
    assert all(torch.equal(a, b) for a, b in zip(lean_logits, hf_logits, strict=True))
    assert lean_tokens == hf_tokens


def test_models_the_lean_pass_would_change_run_through_transformers() -> None:
    """A forward hook (an adapter, a probe) or a subclassed model would be skipped by the lean
    pass: such models run transformers' forward, hook and all."""
    model = tiny_model(0)
    assert lean_pass.supports(model)
    calls: list[int] = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    assert not lean_pass.supports(model)
    engine = Engine(model, TOK, max_batch=2)
    assert engine.runner.lean is None
    engine.add(0, [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step([0])
    assert calls  # the hook ran: the pass went through transformers
    handle.remove()
    assert lean_pass.supports(model)

    class Custom(type(model)):
        pass

    model.__class__ = Custom
    assert not lean_pass.supports(model)
