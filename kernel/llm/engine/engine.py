"""The continuously batched engine: admits, steps, switches out and cancels sequences."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from transformers import PreTrainedModel

from kernel.llm.engine import speculate
from kernel.llm.engine.prefix import PrefixCache
from kernel.llm.engine.ragged import Chunk
from kernel.llm.engine.runner import ModelRunner
from kernel.llm.engine.sampling import SamplingParams, sample
from kernel.llm.engine.sequence import Sequence, Status, StepOutput
from kernel.llm.engine.slots import SlotCache

# Two sequences prefilling in the same step whose next pending tokens agree on this many share
# the work: the second waits for the first's prefill pass and then copies its KV.
SHARED_HEAD = 16
# Upper bound on the tokens of one forward pass, to bound activations: a step whose prefill
# chunks add up to more runs them in several passes.
MAX_FORWARD_TOKENS = 8192
# Draft tokens a speculating row proposes at most (speculate.py).
SPECULATE_TOKENS = 5


class Engine:
    """Token-level continuous batching over a transformers causal LM.

    Mechanism only: the caller (a scheduler) decides which sequences run at each step. See the
    package docstring for the contract.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any, *, max_batch: int = 64,
                 prefill_chunk: int = 256, prefix_cache_tokens: int = 16384,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                 speculate_max_batch: int = 0, speculate_tokens: int = SPECULATE_TOKENS,
                 lean: bool = True, prefix_cache_bytes: int | None = None) -> None:
        if max_batch < 1 or prefill_chunk < 1 or prefix_cache_tokens < 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, the cache size >= 0")
        if speculate_max_batch < 0 or speculate_tokens < 1:
            raise ValueError("speculate_max_batch must be >= 0, speculate_tokens >= 1")
        self.device = torch.device(device)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        config = model.config.get_text_config(decoder=True)
        _check_full_attention(config)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.slots = SlotCache(config.num_hidden_layers, kv_heads, head_dim, self.model.dtype,
                               self.device)
        if prefix_cache_bytes is not None:  # a budget in bytes: as many tokens as it holds
            prefix_cache_tokens = max(0, prefix_cache_bytes) // self.slots.token_bytes
        self.prefix = PrefixCache(prefix_cache_tokens)
        self.runner = ModelRunner(self.model, self.slots, lean=lean)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        # Steps with at most this many decoding rows speculate (0: never): a small batch
        # leaves the pass memory-bound, so verifying a few more tokens per row is nearly free.
        self.speculate_max_batch = speculate_max_batch
        self.speculate_tokens = speculate_tokens
        self.vocab = config.vocab_size
        self.max_len = getattr(config, "max_position_embeddings", None) or 1 << 30
        self.eos = _eos_ids(tokenizer, model)
        self._seqs: dict[int, Sequence] = {}
        self._counts = dict.fromkeys(
            ("steps", "forwards", "prefill_tokens", "tokens_generated", "prefix_lookups",
             "prefix_hits", "prefix_tokens_looked_up", "prefix_tokens_reused", "preemptions",
             "resumed_from_snapshot", "spec_rows", "spec_drafted", "spec_accepted"), 0)

    # -- the contract -----------------------------------------------------------------------

    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it starts when a step's `run` first names it."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the "
                             f"model's {self.max_len}-token context")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab:
            raise ValueError(f"prompt token outside the vocabulary of {self.vocab}")
        self._seqs[seq_id] = Sequence(seq_id, prompt_ids, params, self.tokenizer, self.device)

    def step(self, run: list[int], one_token: Collection[int] = ()) -> dict[int, StepOutput]:
        """One iteration over exactly the sequences in `run`.

        New and resumed sequences get a row and are prefilled, at most `prefill_chunk` pending
        tokens each, so a long prompt delays the others by one chunk, not by its whole length.
        Decoding sequences produce one token each, or several when a speculative draft is
        accepted (greedy rows, batches of at most `speculate_max_batch` decoders), except
        those named in `one_token` (a caller's per-step token budget). Finished sequences leave
        the engine.
        """
        seqs = self._lookup(run)
        self._counts["steps"] += 1
        outputs = {s.id: StepOutput([], "", False) for s in seqs}
        with torch.no_grad():
            self._admit(seqs)
            for s in seqs:
                if s.pending > 1:
                    self._extend(s)
            decoders = [s for s in seqs if s.pending == 1]
            drafts = self._drafts([s for s in decoders if s.id not in one_token])
            leaders, followers = _share([s for s in seqs if s.pending > 1])
            # One pass feeds the decoders and the leaders; the followers then copy what the
            # leaders computed and split again, and the new leaders get a second pass. A third
            # round would trade more passes for the same work: the rest wait a step.
            ready, verified = self._run(decoders, leaders, drafts)
            for s in followers:
                self._extend(s)
            leaders, followers = _share(followers)
            ready += self._run([], leaders, {})[0]
            for s in followers:
                self._extend(s)
            if ready:
                tokens = sample(torch.stack([row for _, row in ready]),
                                [s.params for s, _ in ready], [s.generator for s, _ in ready])
                for (s, _), token in zip(ready, tokens, strict=True):
                    self._emit(s, token, outputs[s.id])
            for s, draft, rows in verified:
                self._verify(s, draft, rows, outputs[s.id])
        for s in seqs:
            outputs[s.id].computed, outputs[s.id].reused = s.computed, s.reused
        return outputs

    def preempt(self, seq_id: int, keep_kv: bool = True) -> None:
        """Switch a sequence out: keep a copy of its KV, or drop it and recompute on resume.

        Dropped KV goes to the prefix cache, so a resume finds it there unless it was evicted.
        """
        s = self._get(seq_id)
        if s.id in self.slots:
            if keep_kv:
                # Host memory: on a GPU the snapshot must not hold device memory.
                s.snapshot = self.slots.read(s.id, 0, s.computed).to("cpu")
            else:
                self._publish(s)
                s.computed = 0
            self.slots.remove(s.id)
            s.status = Status.PREEMPTED
            self._counts["preemptions"] += 1
        elif s.snapshot is not None and not keep_kv:
            snapshot = s.snapshot
            self.prefix.insert(s.tokens[:s.computed],
                               lambda a, b: snapshot[:, :, :, a:b].clone())
            s.snapshot, s.computed = None, 0

    def cancel(self, seq_id: int) -> None:
        """Forget a sequence and free its KV; unknown or finished ids are ignored."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            return
        if s.id in self.slots:
            self.slots.remove(s.id)
        s.snapshot = None

    def idle(self, now: float | None = None) -> None:
        """Nothing to run: the KV store gives back memory it has held unused long enough."""
        self.slots.trim(now)

    def stats(self) -> dict[str, int | float]:
        by_status = {status: 0 for status in Status}
        for s in self._seqs.values():
            by_status[s.status] += 1
        slot_bytes = self.slots.used_tokens * self.slots.token_bytes
        snapshot_bytes = sum(s.snapshot.numel() * s.snapshot.element_size()
                             for s in self._seqs.values() if s.snapshot is not None)
        c = self._counts
        return {
            "sequences": len(self._seqs),
            "running": by_status[Status.RUNNING],
            "preempted": by_status[Status.PREEMPTED],
            "queued": by_status[Status.QUEUED],
            "kv_bytes": slot_bytes + snapshot_bytes + self.prefix.bytes,
            "kv_slot_bytes": slot_bytes,
            "kv_snapshot_bytes": snapshot_bytes,
            "kv_reserved_bytes": self.slots.reserved_bytes,
            "prefix_cache_bytes": self.prefix.bytes,
            "prefix_cache_tokens": self.prefix.tokens,
            "prefix_hit_rate": c["prefix_tokens_reused"] / max(1, c["prefix_tokens_looked_up"]),
            **c,
        }

    # -- a step's parts ---------------------------------------------------------------------

    def _lookup(self, run: list[int]) -> list[Sequence]:
        if len(set(run)) != len(run):
            raise ValueError("a sequence appears twice in run")
        if len(run) > self.max_batch:
            raise ValueError(f"run has {len(run)} sequences, max_batch is {self.max_batch}")
        return [self._get(i) for i in run]

    def _get(self, seq_id: int) -> Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"no sequence {seq_id} (never added, finished or cancelled)") from None

    def _admit(self, seqs: list[Sequence]) -> None:
        """Give rows to the sequences that lack one, restoring snapshots."""
        for s in seqs:
            if s.id in self.slots:
                continue
            self.slots.add(s.id)
            s.status = Status.RUNNING
            if s.snapshot is not None:
                self.slots.load(s.id, s.snapshot, 0)
                s.snapshot = None
                self._counts["resumed_from_snapshot"] += 1
            elif s.computed == 0:
                s.reused = 0
                self._counts["prefix_lookups"] += 1
                self._counts["prefix_tokens_looked_up"] += len(s.tokens) - 1

    def _extend(self, s: Sequence) -> None:
        """Copy whatever the prefix cache holds of the sequence's tokens (but the last) past
        what its row already has."""
        pieces = self.prefix.match(s.tokens[:-1])
        cached = sum(piece.shape[3] for piece in pieces)
        if cached <= s.computed:
            return
        self.slots.reserve(cached)
        at = 0
        for piece in pieces:
            n = piece.shape[3]
            if at + n > s.computed:
                skip = max(0, s.computed - at)
                self.slots.load(s.id, piece[:, :, :, skip:], at + skip)
            at += n
        c = self._counts
        c["prefix_hits"] += s.reused == 0
        c["prefix_tokens_reused"] += cached - s.computed
        s.reused += cached - s.computed
        s.computed = cached

    def _drafts(self, decoders: list[Sequence]) -> dict[int, list[int]]:
        """Speculative drafts (speculate.propose) for the greedy, unconstrained decoders, when
        there are at most `speculate_max_batch` of them; none reach past max_tokens or the
        model's context."""
        drafts: dict[int, list[int]] = {}
        if not 0 < len(decoders) <= self.speculate_max_batch:
            return drafts
        for s in decoders:
            if not s.params.greedy or s.params.constraint is not None:
                continue
            room = min(self.speculate_tokens, s.params.max_tokens - s.generated - 1,
                       self.max_len - len(s.tokens) - 1)
            draft = speculate.propose(s.tokens, room)
            if draft:
                drafts[s.id] = draft
        return drafts

    def _run(self, decoders: list[Sequence], prefills: list[Sequence],
             drafts: dict[int, list[int]]
             ) -> tuple[list[tuple[Sequence, torch.Tensor]],
                        list[tuple[Sequence, list[int], torch.Tensor]]]:
        """Feed each decoder its pending token (and its draft, if it has one) and each
        prefilling sequence its next chunk, in as few passes as MAX_FORWARD_TOKENS allows (one,
        normally); publish the new prefill KV. Returns the sequences with no pending tokens
        left, with their last logits, and the drafting decoders with their drafts and the
        logits after each fed token (to be checked by `_verify`)."""
        ready: list[tuple[Sequence, torch.Tensor]] = []
        verified: list[tuple[Sequence, list[int], torch.Tensor]] = []
        if not decoders and not prefills:
            return ready, verified
        # A drafting decoder is a short chunk of its own, like a prefill's, in the first pass.
        drafting = [s for s in decoders if s.id in drafts]
        decoders = [s for s in decoders if s.id not in drafts]
        (lo,) = self.slots.arrange([[s.id for s in decoders]])
        decoders = sorted(decoders, key=lambda s: self.slots.row(s.id))
        for group in _batches(decoders, prefills, self.prefill_chunk):
            chunks = [Chunk(self.slots.row(s.id), s.computed,
                            [s.tokens[s.computed], *drafts[s.id]], verify=True)
                      for s in drafting]
            chunks += [Chunk(self.slots.row(s.id), s.computed,
                             s.tokens[s.computed:s.computed + min(s.pending, self.prefill_chunk)])
                       for s in group]
            logits = self.runner.forward(lo, [s.computed for s in decoders],
                                         [s.tokens[s.computed] for s in decoders], chunks)
            self._counts["forwards"] += 1
            for s in decoders:
                s.computed += 1
                self.slots.set_length(s.id, s.computed)
            ready += zip(decoders, logits[:len(decoders)], strict=True)
            at = len(decoders)
            for s, chunk in zip(drafting, chunks, strict=False):
                n = len(chunk.tokens)
                # Held until _verify rolls the row back to what was accepted.
                self.slots.set_length(s.id, s.computed + n)
                verified.append((s, drafts[s.id], logits[at:at + n]))
                at += n
            for s, chunk, row in zip(group, chunks[len(drafting):], logits[at:], strict=True):
                s.computed += len(chunk.tokens)
                self.slots.set_length(s.id, s.computed)
                self._counts["prefill_tokens"] += len(chunk.tokens)
                if s.pending == 0:
                    ready.append((s, row))
                self._publish(s)
            decoders, drafting = [], []  # fed in the first pass
        return ready, verified

    def _verify(self, s: Sequence, draft: list[int], logits: torch.Tensor,
                out: StepOutput) -> None:
        """Emit the longest prefix of the draft that greedy decoding agrees with and the
        model's token after it; the row keeps the KV of the accepted tokens only."""
        greedy = logits.float().argmax(dim=-1).tolist()  # sample()'s choice for greedy rows
        tokens = speculate.accept(draft, greedy)
        c = self._counts
        c["spec_rows"] += 1
        c["spec_drafted"] += len(draft)
        c["spec_accepted"] += len(tokens) - 1
        s.computed += 1  # the pending token
        for i, token in enumerate(tokens):
            if i:
                s.computed += 1  # the previous token was the draft's: its KV is in the row
            self._emit(s, token, out)
            if out.finished:
                return
        self.slots.set_length(s.id, s.computed)

    def _emit(self, s: Sequence, token: int, out: StepOutput) -> None:
        """Append a sampled token; report it and any text; finish the sequence if it is done."""
        s.tokens.append(token)
        out.new_tokens.append(token)
        self._counts["tokens_generated"] += 1
        constraint = s.params.constraint
        if constraint is not None:
            constraint.advance(token)
        if constraint is not None and constraint.error is not None:
            out.finish_reason, out.error = "error", constraint.error
        elif token in self.eos and not s.params.ignore_eos:
            out.finish_reason = "stop"
        else:
            out.text_delta += s.text.push(token)
            if s.text.stopped or (constraint is not None and constraint.complete):
                out.finish_reason = "stop"
            elif s.generated >= s.params.max_tokens or len(s.tokens) >= self.max_len:
                out.finish_reason = "length"
        if out.finish_reason is not None:
            out.text_delta += s.text.finish()
            out.finished = True
            self._publish(s)
            self.slots.remove(s.id)
            del self._seqs[s.id]

    def _publish(self, s: Sequence) -> None:
        """Offer the sequence's computed KV to the prefix cache."""
        if self.prefix.capacity:
            self.prefix.insert(s.tokens[:s.computed],
                               lambda a, b: self.slots.read(s.id, a, b))


def _share(seqs: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """Split prefilling sequences into leaders and followers: a follower's next SHARED_HEAD
    pending tokens (at the same position) are a leader's, so it waits for the leader's pass in
    this step and copies the KV from the prefix cache instead of computing it again."""
    leaders, followers, heads = [], [], set()
    for s in seqs:
        head = (s.computed, tuple(s.tokens[s.computed:s.computed + SHARED_HEAD]))
        if s.pending - 1 >= SHARED_HEAD and head in heads:
            followers.append(s)
        else:
            heads.add(head)
            leaders.append(s)
    return leaders, followers


def _batches(decoders: list[Sequence], prefills: list[Sequence], chunk: int
             ) -> list[list[Sequence]]:
    """Split the prefills into passes of at most MAX_FORWARD_TOKENS tokens, the decoders'
    counting in the first; there is always at least one pass, possibly without prefills."""
    passes: list[list[Sequence]] = [[]]
    used = len(decoders)
    for s in prefills:
        n = min(s.pending, chunk)
        if passes[-1] and used + n > MAX_FORWARD_TOKENS:
            passes.append([])
            used = 0
        passes[-1].append(s)
        used += n
    return passes


def _check_full_attention(config: Any) -> None:
    """The slot store keeps every token's KV: sliding-window or linear layers would differ."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"only full-attention models are supported, not {sorted(kinds)}")


def _eos_ids(tokenizer: Any, model: PreTrainedModel) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
