"""One ragged forward pass of a transformers causal LM over the slot store's rows."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

from kernel.llm.engine import lean as lean_module
from kernel.llm.engine.ragged import ATTENTION, Chunk, Ragged
from kernel.llm.engine.slots import SlotCache


class ModelRunner:
    """Feeds decode rows one token each and prefill chunks their tokens, all in one pass, and
    returns the logits after each decode token and after each chunk's last token (after every
    token of a verify chunk).

    The tokens are packed into one [1, T] sequence with their own positions, so the linear
    layers see T tokens and no padding; ragged.attention keeps each token to its own row.
    A Llama runs the pass through lean.py (the same operations without transformers' per-layer
    Python); `lean=False`, or any other model, through the model's own forward.
    """

    def __init__(self, model: PreTrainedModel, slots: SlotCache, *, lean: bool = True) -> None:
        self.model = model
        self.slots = slots
        self.lean = lean_module.LeanLlama(model) if lean and lean_module.supports(model) else None
        self.layers = model.config.get_text_config(decoder=True).num_hidden_layers
        # transformers renamed past_key_values to cache; accept models from either side.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Any 4D mask: transformers hands a prepared mask to attention untouched, and the
        # ragged attention builds its own, so no per-pass [T, columns] mask is made.
        self._mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=slots.device)

    def forward(self, lo: int, decode_cols: list[int], decode_tokens: list[int],
                chunks: list[Chunk]) -> torch.Tensor:
        """Rows lo.. take decode_tokens[i] at column decode_cols[i]; each chunk's tokens go to
        its row from its start. Returns logits [len(decode_tokens) + len(chunks), vocab], with a
        verify chunk counting as its number of tokens."""
        device = self.slots.device
        r = Ragged(lo, decode_cols, decode_tokens, chunks, device, self.slots.dtype)
        self.slots.reserve(r.columns)
        ids = torch.tensor([r.token_ids()], device=device)
        positions = torch.tensor([r.positions()], device=device)
        keep = torch.tensor(r.last_tokens(), device=device)
        if self.lean is not None:
            with self.slots.bound(r):
                logits = self.lean(r, ids, positions, keep)
            self._check(r)
            return logits
        with self.slots.bound(r), _implementation(self.model.config, ATTENTION):
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=self._mask,
                             use_cache=True, logits_to_keep=keep, ragged=r,
                             **{self._cache_arg: self.slots})
        self._check(r)
        return out.logits[0]

    def _check(self, r: Ragged) -> None:
        if r.calls != self.layers:
            # A model whose attention bypasses transformers' interface would have attended
            # across the packed rows: refuse rather than return its logits.
            raise RuntimeError(f"the model ran the ragged attention in {r.calls} of "
                               f"{self.layers} layers; its attention is not supported")


@contextmanager
def _implementation(config: Any, name: str) -> Iterator[None]:
    """Route the model's attention to `name` for one pass; the model is left as it was, so
    plain `generate` on it still runs its own attention."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before
