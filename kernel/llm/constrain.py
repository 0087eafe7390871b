"""Turning a chat request into sampling parameters, including JSON mode's token constraint.

`JsonConstraint` sits in a sequence's sampler: it only lets through tokens whose text keeps the
output a valid JSON-object prefix (`kernel.llm.jsonmode`) whose closing still fits in the tokens
left; once the tokens left are just enough to close the value it forces the closing text.
Greedy decoding takes the best allowed token; sampling draws from the model's distribution with
disallowed tokens removed (rejection: a refused draw is zeroed and the rest renormalised, which
is exactly sampling the masked distribution).
"""

from __future__ import annotations

from typing import Any

import torch

from kernel.llm.engine import SamplingParams
from kernel.llm.jsonmode import JsonState
from sdk import abi

_REJECTIONS = 64  # draws refused before falling back to a scan in probability order
_SCAN_CHUNK = 256


def token_pieces(tokenizer: Any) -> list[str]:
    """The text of every token on its own, computed once per tokenizer."""
    pieces = getattr(tokenizer, "_agentos_pieces", None)
    if pieces is None:
        size = len(tokenizer)
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in range(size)]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pieces = ["" if i in special or "\ufffd" in p else p for i, p in enumerate(pieces)]
        tokenizer._agentos_pieces = pieces
    return pieces


class JsonConstraint:
    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.pieces = token_pieces(tokenizer)
        self.state = JsonState()
        self.left = max_tokens
        self.forced: list[int] = []

    @property
    def complete(self) -> bool:
        return self.state.complete

    def _allowed(self, token: int) -> bool:
        """The token keeps the output a valid prefix whose closing still fits in the tokens
        left after it. Closing text is ASCII, so its length in characters bounds its length in
        (byte-level) tokens: the budget can never run out with the value open."""
        if token >= len(self.pieces) or not self.pieces[token]:
            return False
        after = self.state.copy()
        return after.feed(self.pieces[token]) and len(after.closing()) <= self.left - 1

    def _closing_tokens(self) -> list[int]:
        return self.tokenizer.encode(self.state.closing(), add_special_tokens=False)

    def pick(self, logits: torch.Tensor, params: SamplingParams,
             generator: torch.Generator | None) -> int:
        """The next token for this sequence, from its row of logits."""
        if not self.forced:
            closing = self.state.closing()
            if closing and len(closing) >= self.left:
                self.forced = self._closing_tokens()
        if self.forced:
            return self.forced[0]
        if params.greedy:
            return self._scan(logits)
        probs = _filtered_probs(logits.float(), params)
        for _ in range(_REJECTIONS):
            if float(probs.sum()) <= 0:
                break
            token = int(torch.multinomial(probs, 1, generator=generator))
            if self._allowed(token):
                return token
            probs[token] = 0.0
        return self._scan(probs)

    def _scan(self, scores: torch.Tensor) -> int:
        order = torch.argsort(scores, descending=True)
        for start in range(0, order.numel(), _SCAN_CHUNK):
            for token in order[start:start + _SCAN_CHUNK].tolist():
                if self._allowed(token):
                    return token
        raise RuntimeError("no token continues the JSON value")  # every prefix has one: "}"

    def advance(self, token: int) -> None:
        """Record the token the sequence emitted."""
        if self.forced and self.forced[0] == token:
            self.forced.pop(0)
        self.state.feed(self.pieces[token] if token < len(self.pieces) else "")
        self.left -= 1


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, index = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
        probs = torch.zeros_like(probs).scatter(0, index[keep], sorted_probs[keep])
    return probs


def sampling_params(args: abi.ChatArgs, tokenizer: Any) -> SamplingParams:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, stop=list(args.stop), seed=args.seed,
                            ignore_eos=args.ignore_eos)
    json_mode = args.response_format == "json" or (args.tools and args.tool_choice == "required")
    if json_mode:
        if args.max_tokens < 2:
            raise ValueError("JSON mode needs max_tokens >= 2 (the smallest object is {})")
        params.constraint = JsonConstraint(tokenizer, args.max_tokens)
    return params
