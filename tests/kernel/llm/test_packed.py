"""Linear layers packed for oneDNN (kernel/llm/engine/packed.py): only where the products stay
bit for bit the same, so the engine's greedy outputs do not change; tied weights kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kernel.llm.engine import Engine, SamplingParams
from kernel.llm.engine import packed as packing
from tests.tinymodel import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
pytestmark = pytest.mark.skipif(not packing.available(), reason="torch built without oneDNN")


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def greedy(model: nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(model, TOK, max_batch=8, prefix_cache_tokens=0)
    for i, ids in enumerate(prompts):
        engine.add(i, ids, SamplingParams(max_tokens=16, ignore_eos=True))
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    running = list(out)
    while running:
        for i, step in engine.step(running).items():
            out[i] += step.new_tokens
            if step.finished:
                running.remove(i)
    return [out[i] for i in sorted(out)]


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, len(TOK), (n,), generator=g).tolist() for n in (5, 40, 17)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packing_changes_no_logit_and_no_token(dtype: torch.dtype) -> None:
    plain = tiny_model(0).to(dtype)
    model = copy.deepcopy(plain)
    count = packing.pack_linears(model)
    if dtype is torch.bfloat16:  # oneDNN's packed bf16 product is the plain one on x86
        assert count == len(linears(model)) > 0
    ids = torch.tensor([prompts()[1]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    assert greedy(model, prompts()) == greedy(plain, prompts())
    assert packing.pack_linears(model) == 0  # twice: nothing more


def test_a_layer_whose_packed_product_differs_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is what keeps outputs identical: a reorder that perturbs the weight (as a
    kernel with another sum order would) packs nothing, and the model computes as before."""
    reorder = torch.ops.mkldnn._reorder_linear_weight

    class Ops:
        @staticmethod
        def _reorder_linear_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
            return reorder(weight * 1.0625, rows)  # exact in bfloat16: no rounding back

        _linear_pointwise = torch.ops.mkldnn._linear_pointwise

    monkeypatch.setattr(torch.ops, "mkldnn", Ops)
    model = tiny_model(0).to(torch.bfloat16)
    assert packing.pack_linears(model) == 0
    assert all(m.weight is not None and "forward" not in m.__dict__ for m in linears(model))


def test_a_tied_weight_is_kept_and_the_others_dropped() -> None:
    model = tiny_model(0).to(torch.bfloat16)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 does
    before = copy.deepcopy(model)
    assert packing.pack_linears(model) == len(linears(model))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the embedding needs it
    assert all(m.weight is None for m in linears(model.model))  # the packed copy replaces it
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before(ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fusing_projections_changes_no_logit_and_no_token(dtype: torch.dtype) -> None:
    """q/k/v and gate/up become one layer each; the model's own forward (through the slices)
    and the engine's lean pass (through the fused layers) compute what they did."""
    plain = tiny_model(0).to(dtype)
    model = copy.deepcopy(plain)
    layers = plain.config.num_hidden_layers
    assert packing.fuse_projections(model) == 2 * layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert type(attn.qkv_proj) is nn.Linear and type(mlp.gate_up_proj) is nn.Linear
    assert isinstance(attn.q_proj, packing._Slice) and isinstance(mlp.up_proj, packing._Slice)
    assert packing.fuse_projections(model) == 0  # twice: nothing more
    ids = torch.tensor([prompts()[1]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    assert greedy(model, prompts()) == greedy(plain, prompts())
    # Packing after fusing packs the fused layers: 4 per decoder layer and the head.
    if dtype is torch.bfloat16:
        assert packing.pack_linears(model) == 4 * layers + 1
        assert greedy(model, prompts()) == greedy(plain, prompts())


def test_projections_whose_fused_product_differs_stay_apart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe keeps fusing honest: a fused weight off by a factor (as a kernel that sums
    a wider matrix in another order would be) fuses nothing."""
    monkeypatch.setattr(packing, "_concat_weights",
                        lambda weights: torch.cat(weights) * 1.0625)
    model = tiny_model(0).to(torch.bfloat16)
    assert packing.fuse_projections(model) == 0
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is nn.Linear and not hasattr(attn, "qkv_proj")


def test_packed_projections_are_not_fused() -> None:
    """Fusing reads the layers' weights: once packing has dropped them it leaves them be."""
    model = tiny_model(0).to(torch.bfloat16)
    packing.pack_linears(model)
    assert packing.fuse_projections(model) == 0
    assert greedy(model, prompts()) == greedy(tiny_model(0).to(torch.bfloat16), prompts())
