"""One forward pass of a transformers causal LM over a contiguous range of slot rows."""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel

from kernel.llm.engine.slots import SlotCache

# Attention implementations whose masks the runner knows how to build: a boolean mask for SDPA,
# an additive one for eager. Others (flash, flex, paged) would silently ignore a 4D mask.
_MASKED = {"sdpa", "eager"}


class ModelRunner:
    """Feeds each row its chunk of tokens and returns the logits after each chunk's last token.

    Rows are fed as one [rows, q] batch. Chunks shorter than q are padded on the left, so every
    row's last real token sits at the last position and only that position reaches the LM head
    (`logits_to_keep=1`). Padding positions write their throwaway KV to columns past the row's
    real tokens, where no real query looks and the next real token will overwrite them.
    """

    def __init__(self, model: PreTrainedModel, slots: SlotCache, pad_id: int) -> None:
        impl = model.config._attn_implementation
        if impl not in _MASKED:
            raise ValueError(f"attention implementation {impl!r} is not supported; "
                             f"load the model with attn_implementation='sdpa' or 'eager'")
        self.model = model
        self.slots = slots
        self.pad_id = pad_id
        self._additive = impl == "eager"
        # transformers renamed past_key_values to cache; accept models from either side.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, lo: int, starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Row lo+g receives chunks[g] at columns starts[g]..; returns logits [rows, vocab]."""
        device = self.slots.device
        rows, q = len(chunks), max(len(c) for c in chunks)
        if q == 1:
            ids = torch.tensor(chunks, device=device)
            cols = torch.tensor(starts, device=device)[:, None]
        else:
            ids = torch.full((rows, q), self.pad_id, dtype=torch.long)
            cols = torch.empty((rows, q), dtype=torch.long)
            for g, (start, chunk) in enumerate(zip(starts, chunks, strict=True)):
                n = len(chunk)
                ids[g, q - n:] = torch.tensor(chunk)
                cols[g, q - n:] = torch.arange(start, start + n)
                cols[g, :q - n] = torch.arange(start + n, start + q)
            ids, cols = ids.to(device), cols.to(device)
        kv_len = max(starts) + q
        self.slots.reserve(kv_len)
        # Query j of row g sees columns 0..cols[g, j]: its own past and itself.
        mask = torch.arange(kv_len, device=device)[None, None, :] <= cols[:, :, None]
        mask = mask[:, None]
        if self._additive:
            dtype = self.slots.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(
                ~mask, torch.finfo(dtype).min)
        start = starts[0] if rows == 1 else None
        with self.slots.bound(lo, cols, kv_len, start):
            out = self.model(input_ids=ids, position_ids=cols, attention_mask=mask,
                             use_cache=True, logits_to_keep=1, **{self._cache_arg: self.slots})
        return out.logits[:, -1]
