"""A request's state inside the engine, and what one step reports about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kernel.llm.engine.sampling import SamplingParams, make_generator
from kernel.llm.engine.text import TextStream

FinishReason = Literal["stop", "length", "error"]


class Status(enum.Enum):
    QUEUED = "queued"  # added, never run
    RUNNING = "running"  # holds a row in the slot store
    PREEMPTED = "preempted"  # switched out: a KV snapshot, or only its tokens


@dataclass
class StepOutput:
    """What one step did for one sequence."""

    new_tokens: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None  # why, when finish_reason is "error" (its constraint failed)
    computed: int = 0  # tokens of the sequence whose KV now exists (prefill progress)
    reused: int = 0  # of those, taken from the prefix cache since it was (re)started


class Sequence:
    """One request: its tokens, how far its KV reaches, its sampler and text stream.

    `tokens` is the prompt followed by everything generated; `computed` counts the leading
    tokens whose KV exists (in the slot store, or in `snapshot` while preempted). The tokens
    past `computed` are pending: a whole prompt when new, one token while decoding, a prompt
    and its output when resuming by recompute. Every step feeds pending tokens, and once none
    are left the last logits pick the next token.
    """

    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Any, device: torch.device) -> None:
        self.id = seq_id
        self.tokens = list(prompt_ids)
        self.prompt_len = len(self.tokens)
        self.params = params
        self.generator = make_generator(params, device)
        self.text = TextStream(tokenizer, params.stop)
        self.computed = 0
        self.reused = 0  # tokens copied from the prefix cache since the last lookup
        self.snapshot: torch.Tensor | None = None
        self.status = Status.QUEUED

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len
