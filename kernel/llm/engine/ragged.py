"""The ragged batch: one forward pass over decode rows and prefill chunks, and its attention.

All the step's tokens go through the model packed as one sequence [1, T], so every weight is
read once per step whatever mixes in it and no token is padding. Only attention needs to know
which row each token belongs to; transformers calls `attention` (registered under ATTENTION)
with the pass's Ragged layout as a keyword argument, and it attends each token to its own row
of the slot store: the decode rows as one batched SDPA call (a row's single query against its
own KV, masked at its length), each prefill chunk as a causal SDPA call over its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

# The name the runner gives the model's attention implementation during a ragged pass.
ATTENTION = "agentos_ragged"


@dataclass
class Chunk:
    """A run of one row's pending tokens: they go to columns start.. of the row. A `verify`
    chunk (a decoding row's pending token and a speculative draft) wants the logits after each
    of its tokens, not only after the last."""

    row: int
    start: int
    tokens: list[int]
    verify: bool = False


@dataclass
class Ragged:
    """One pass's layout: decode rows lo.. feed one token each (`decode_tokens`, at columns
    `decode_cols`), packed first in row order; then each prefill chunk's tokens in order.

    The masks are built once per pass here, not once per layer, as the additive masks SDPA
    would make of boolean ones at every call (0 where a query sees a key, -inf where not, in
    the model's dtype: the same sums, without a `where` per layer and call). `kv` is the slot
    store's tensor while the pass runs (SlotCache.bound sets it).
    """

    lo: int
    decode_cols: list[int]
    decode_tokens: list[int]
    chunks: list[Chunk]
    device: torch.device
    dtype: torch.dtype = torch.float32
    kv: torch.Tensor | None = field(init=False, default=None)
    calls: int = field(init=False, default=0)  # layers that ran `attention` in this pass
    decode_mask: torch.Tensor | None = field(init=False, default=None)
    chunk_masks: list[torch.Tensor] = field(init=False, default_factory=list)
    # The decode rows' KV destinations, made once per pass for every layer's write.
    decode_rows_at: torch.Tensor | None = field(init=False, default=None)
    decode_cols_at: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.decode_cols:
            cols = torch.tensor(self.decode_cols, device=self.device)
            self.decode_cols_at = cols
            self.decode_rows_at = torch.arange(self.lo, self.lo + len(self.decode_cols),
                                               device=self.device)
            # Row r's query sees its columns 0..cols[r]: its past and itself.
            self.decode_mask = self._additive(
                (torch.arange(self.decode_len, device=self.device)[None, :]
                 <= cols[:, None])[:, None, None, :])
        for c in self.chunks:
            n = len(c.tokens)
            keys = torch.arange(c.start + n, device=self.device)
            queries = torch.arange(c.start, c.start + n, device=self.device)
            self.chunk_masks.append(self._additive((keys[None, :] <= queries[:, None])[None, None]))

    def _additive(self, sees: torch.Tensor) -> torch.Tensor:
        """What SDPA makes of a boolean mask (torch's convert_boolean_attn_mask)."""
        return torch.where(sees, 0.0, torch.scalar_tensor(float("-inf"), dtype=self.dtype,
                                                          device=self.device))

    @property
    def rows(self) -> int:
        return len(self.decode_cols)

    @property
    def decode_len(self) -> int:
        """Columns the decode rows' attention reads: up to the longest row's new token."""
        return max(self.decode_cols) + 1

    @property
    def columns(self) -> int:
        """Columns the pass writes up to, in any row."""
        ends = [c.start + len(c.tokens) for c in self.chunks]
        return max(ends + ([self.decode_len] if self.decode_cols else []))

    def token_ids(self) -> list[int]:
        return self.decode_tokens + [t for c in self.chunks for t in c.tokens]

    def positions(self) -> list[int]:
        """Each packed token's position in its own sequence."""
        return self.decode_cols + [c.start + j for c in self.chunks
                                   for j in range(len(c.tokens))]

    def last_tokens(self) -> list[int]:
        """Packed index of each decode row's token and each chunk's last token (every token of
        a verify chunk), in packing order: the tokens whose logits the pass returns."""
        at, last = self.rows, list(range(self.rows))
        for c in self.chunks:
            first = at if c.verify else at + len(c.tokens) - 1
            at += len(c.tokens)
            last.extend(range(first, at))
        return last


def write(r: Ragged, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store a pass's new keys and values ([1, kv_heads, T, dim]) in the slot store's tensor
    ([layers, 2, rows, kv_heads, columns, dim]) at each token's row and column."""
    kv = r.kv
    assert kv is not None
    n = r.rows
    if n == 1:
        kv[layer, 0, r.lo, :, r.decode_cols[0]] = keys[0, :, 0]
        kv[layer, 1, r.lo, :, r.decode_cols[0]] = values[0, :, 0]
    elif n:
        rows, cols = r.decode_rows_at, r.decode_cols_at
        kv[layer, 0, rows, :, cols] = keys[0, :, :n].transpose(0, 1)
        kv[layer, 1, rows, :, cols] = values[0, :, :n].transpose(0, 1)
    at = n
    for c in r.chunks:
        end = at + len(c.tokens)
        kv[layer, 0, c.row, :, c.start:c.start + len(c.tokens)] = keys[0, :, at:end]
        kv[layer, 1, c.row, :, c.start:c.start + len(c.tokens)] = values[0, :, at:end]
        at = end


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
              *, ragged: Ragged, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """Attend each packed query ([1, heads, T, dim]) to its own row's KV in the slot store,
    which already holds this pass's keys and values. Returns [1, T, heads, dim] as
    transformers' attention functions do; `key`, `value` and `attention_mask` are unused."""
    slot_kv = ragged.kv
    assert slot_kv is not None
    ragged.calls += 1
    layer = module.layer_idx
    heads, dim = query.shape[1], query.shape[3]
    kv_heads = slot_kv.shape[3]
    out = []
    n = ragged.rows
    if n:
        # [rows, kv_heads, group, dim]: a row's query heads grouped under the KV head they
        # share, so no KV is repeated (head h reads KV head h // group, as repeat_kv does).
        q = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, dim)
        hi, cols = ragged.lo + n, ragged.decode_len
        o = F.scaled_dot_product_attention(
            q, slot_kv[layer, 0, ragged.lo:hi, :, :cols], slot_kv[layer, 1, ragged.lo:hi, :, :cols],
            attn_mask=ragged.decode_mask, scale=scaling)
        out.append(o.reshape(n, heads, dim))
    at = n
    for c, mask in zip(ragged.chunks, ragged.chunk_masks, strict=True):
        end, cols = at + len(c.tokens), c.start + len(c.tokens)
        o = F.scaled_dot_product_attention(
            query[:, :, at:end], slot_kv[layer, 0, c.row:c.row + 1, :, :cols],
            slot_kv[layer, 1, c.row:c.row + 1, :, :cols], attn_mask=mask, scale=scaling,
            enable_gqa=True)
        out.append(o[0].transpose(0, 1))
        at = end
    return (out[0] if len(out) == 1 else torch.cat(out))[None], None


AttentionInterface.register(ATTENTION, attention)
