"""Per-request sampling parameters and the sampler that turns a row of logits into a token."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


class TokenConstraint(Protocol):
    """Per-request token mask (a grammar's matcher, kernel/llm/grammar.py): each step it says
    which tokens may come next, and it follows the tokens the sequence emits."""

    vocab: int  # the token ids its mask covers; ids past it are never allowed

    @property
    def complete(self) -> bool:
        """True once the output is whole: the sequence then stops ("stop")."""
        ...

    @property
    def error(self) -> str | None:
        """Why the output can no longer be followed (e.g. a limit of the grammar's work per
        token was hit); the sequence then ends ("error")."""
        ...

    def fill(self, row: torch.Tensor) -> None:
        """Set the bit of every allowed next token in `row` (int32, (vocab + 31) // 32 words,
        token t at bit t % 32 of word t // 32)."""
        ...

    def advance(self, token: int) -> None:
        """Record the token the sequence emitted."""
        ...


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps the whole vocabulary
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks want fixed-length outputs
    # Request state, not a setting: one constraint (a grammar's matcher) per request.
    constraint: TokenConstraint | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream: its draws do not depend on what else is batched."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` ([rows, vocab]), each row under its own params."""
    logits = logits.float()
    constrained = [(i, p.constraint) for i, p in enumerate(params) if p.constraint is not None]
    if constrained:
        mask(logits, constrained)
    tokens = logits.argmax(dim=-1).tolist()
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[i] = _draw(logits[i], p, gen)
    return tokens


def mask(logits: torch.Tensor, rows: list[tuple[int, TokenConstraint]]) -> None:
    """Set to -inf, in place, each listed row's logits of the tokens its constraint forbids.

    The constraints fill one bitmask (a row each), unpacked to booleans at once and applied to
    those rows in one pass; sampling then proceeds as for any row, so a constrained request
    draws exactly one uniform per token too (preempted and resumed, it repeats its tokens). A
    row whose constraint failed (see `error`) is left as is; the engine ends that sequence when
    it sees the error."""
    vocab = logits.shape[1]
    words = (max(vocab, *(c.vocab for _, c in rows)) + 31) // 32
    bits = torch.zeros((len(rows), words), dtype=torch.int32)
    for j, (_, c) in enumerate(rows):
        c.fill(bits[j, :(c.vocab + 31) // 32])
        if c.error is not None:
            bits[j] = -1
    unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")
    forbidden = torch.from_numpy(~unpacked[:, :vocab].view(np.bool_)).to(logits.device)
    if len(rows) == logits.shape[0]:  # every row is constrained: no gather, no scatter
        logits.masked_fill_(forbidden, float("-inf"))
        return
    index = torch.tensor([i for i, _ in rows], device=logits.device)
    logits[index] = logits[index].masked_fill_(forbidden, float("-inf"))


def _draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    sorted_probs = probs[order]
    cdf = torch.cumsum(sorted_probs, dim=0)
    if p.top_p < 1.0:
        # Keep the smallest head whose mass reaches top_p; the first token always survives.
        keep = (cdf - sorted_probs) < p.top_p
        sorted_probs = sorted_probs * keep
        cdf = torch.cumsum(sorted_probs, dim=0)
    # Exactly one uniform draw per token, so a request's stream advances the same way whether it
    # runs alone, batched, or is preempted and resumed. Its dtype is explicit: torch's default
    # is one setting per process, and a model loading on another thread changes it a moment.
    u = torch.rand((), generator=gen, dtype=torch.float32, device=logits.device) * cdf[-1]
    idx = int(torch.searchsorted(cdf, u.reshape(1), right=True).clamp_(max=cdf.numel() - 1))
    return int(order[idx])
