"""A Llama decoder's ragged pass in plain torch calls: the same operations as transformers'
forward, in the same order, without its per-layer Python.

At a few agents a SmolLM2 decode step is ~30 small matrix products and ~1,000 tensor
operations more; transformers wraps each layer, attention and norm in calls that handle
kwargs, hooks, output capture and cache dispatch, all of which a ragged pass never uses. This
module walks the same modules' weights itself: RMSNorm, the projections (fused q/k/v and
gate/up where `packed.fuse_projections` made them), rotary embedding, the ragged attention of
ragged.py, SiLU, the residuals and the LM head on the kept tokens only. Each operation is the
one transformers' Llama code runs, on the same dtypes, so the logits are bit for bit those of
the transformers forward (tests/kernel/llm/test_lean.py compares them in float32 and
bfloat16, for decode rows, prefill chunks and verify chunks).

Only `LlamaForCausalLM` built from transformers' own Llama modules qualifies (`supports`);
any other model runs through transformers' forward as before (runner.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernel.llm.engine import ragged
from kernel.llm.engine.ragged import Ragged


def supports(model: nn.Module) -> bool:
    """Whether `model` is transformers' Llama, built of its own modules, with nothing added
    (no adapter, hook or replaced layer would run in the lean pass)."""
    try:
        from transformers.models.llama import modeling_llama as llama
    except ImportError:  # pragma: no cover - transformers without Llama
        return False
    if type(model) is not llama.LlamaForCausalLM:
        return False
    inner = model.model
    if type(inner.norm) is not llama.LlamaRMSNorm or type(inner.embed_tokens) is not nn.Embedding:
        return False
    for layer in inner.layers:
        if (type(layer) is not llama.LlamaDecoderLayer
                or type(layer.self_attn) is not llama.LlamaAttention
                or type(layer.mlp) is not llama.LlamaMLP
                or type(layer.input_layernorm) is not llama.LlamaRMSNorm
                or type(layer.post_attention_layernorm) is not llama.LlamaRMSNorm):
            return False
    modules = [model, *model.modules()]
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


@dataclass
class _Layer:
    attn: nn.Module  # ragged.attention reads its layer_idx
    norm1: nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]  # one product, or three concatenated
    heads: int  # query heads: qkv's output is q's columns, then k's, then v's
    qk_width: int  # q's and k's columns
    o: nn.Module
    norm2: nn.Module
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    inter: int
    act: nn.Module
    down: nn.Module
    scaling: float
    head_dim: int


class LeanLlama:
    """`__call__(r, ids, positions, keep)`: the logits [len(keep), vocab] of one ragged pass,
    the KV of its tokens written to the slot store bound to `r`."""

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = model.lm_head
        layers = inner.layers[:model.config.num_hidden_layers]
        self.layers = [self._layer(layer) for layer in layers]

    @staticmethod
    def _layer(layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        fused_qkv = getattr(attn, "qkv_proj", None)
        fused_gu = getattr(mlp, "gate_up_proj", None)
        d = attn.head_dim
        return _Layer(
            attn=attn, norm1=layer.input_layernorm,
            qkv=fused_qkv if fused_qkv is not None else _concat(attn.q_proj, attn.k_proj,
                                                                attn.v_proj),
            heads=attn.config.num_attention_heads,
            qk_width=(attn.config.num_attention_heads + attn.config.num_key_value_heads) * d,
            o=attn.o_proj,
            norm2=layer.post_attention_layernorm,
            gate_up=fused_gu if fused_gu is not None else _concat(mlp.gate_proj, mlp.up_proj),
            inter=mlp.intermediate_size, act=mlp.act_fn, down=mlp.down_proj,
            scaling=attn.scaling, head_dim=d)

    def __call__(self, r: Ragged, ids: torch.Tensor, positions: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # [1, T, hidden]
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        tokens = ids.shape[1]
        for L in self.layers:
            residual = h
            x = _rms(L.norm1, h)
            qkv = L.qkv(x)
            # q and k rotated in one go: the same elementwise operations on each element as
            # apply_rotary_pos_emb's two calls, in half the calls.
            qk = qkv[..., :L.qk_width].view(1, tokens, -1, L.head_dim).transpose(1, 2)
            qk = (qk * cos) + (_rotate_half(qk) * sin)
            q, k = qk[:, :L.heads], qk[:, L.heads:]
            v = qkv[..., L.qk_width:].view(1, tokens, -1, L.head_dim).transpose(1, 2)
            ragged.write(r, L.attn.layer_idx, k, v)
            out, _ = ragged.attention(L.attn, q, k, v, None, L.scaling, ragged=r)
            h = residual + L.o(out.reshape(1, tokens, -1).contiguous())
            residual = h
            x = _rms(L.norm2, h)
            gate, up = L.gate_up(x).split(L.inter, dim=-1)
            h = residual + L.down(L.act(gate) * up)
        h = _rms(self.norm, h)
        return self.head(h[:, keep, :])[0]


def _rms(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward, operation for operation."""
    dtype = h.dtype
    x = h.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _concat(*projections: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Unfused projections as one: their outputs side by side."""
    return lambda x: torch.cat([p(x) for p in projections], dim=-1)
