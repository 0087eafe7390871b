"""The continuously batched engine: admits, steps, switches out and cancels sequences."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from kernel.llm.engine.prefix import PrefixCache
from kernel.llm.engine.runner import ModelRunner
from kernel.llm.engine.sampling import SamplingParams, sample
from kernel.llm.engine.sequence import Sequence, Status, StepOutput
from kernel.llm.engine.slots import SlotCache

# Two sequences prefilling in the same step whose next pending tokens agree on this many share
# the work: the second waits for the first's prefill pass and then copies its KV.
SHARED_HEAD = 16
# A prefill forward pass costs about as much fixed time as ~40 tokens of compute (measured on
# the 135M model, 2 cores), so rows are padded into one pass when that wastes fewer tokens.
PAD_SLACK = 32
# Upper bound on tokens (rows x padded length) in one prefill forward, to bound activations.
MAX_FORWARD_TOKENS = 8192


class Engine:
    """Token-level continuous batching over a transformers causal LM.

    Mechanism only: the caller (a scheduler) decides which sequences run at each step. See the
    package docstring for the contract.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any, *, max_batch: int = 64,
                 prefill_chunk: int = 256, prefix_cache_tokens: int = 16384,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
                 ) -> None:
        if max_batch < 1 or prefill_chunk < 1 or prefix_cache_tokens < 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, the cache size >= 0")
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
        self.prefix = PrefixCache(prefix_cache_tokens)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.runner = ModelRunner(self.model, self.slots, pad)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.vocab = config.vocab_size
        self.max_len = getattr(config, "max_position_embeddings", None) or 1 << 30
        self.eos = _eos_ids(tokenizer, model)
        self._seqs: dict[int, Sequence] = {}
        self._counts = dict.fromkeys(
            ("steps", "forwards", "prefill_tokens", "tokens_generated", "prefix_lookups",
             "prefix_hits", "prefix_tokens_looked_up", "prefix_tokens_reused", "preemptions",
             "resumed_from_snapshot"), 0)

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

    def step(self, run: list[int]) -> dict[int, StepOutput]:
        """One iteration over exactly the sequences in `run`.

        New and resumed sequences get a row and are prefilled, at most `prefill_chunk` pending
        tokens each, so a long prompt delays the others by one chunk, not by its whole length.
        Decoding sequences produce one token each. Finished sequences leave the engine.
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
            leaders, followers = _share([s for s in seqs if s.pending > 1])
            ready: list[tuple[Sequence, torch.Tensor]] = []
            if decoders:
                (lo,) = self.slots.arrange([[s.id for s in decoders]])
                logits = self._forward(lo, decoders, [1] * len(decoders))
                ready += zip(decoders, logits, strict=True)
            # Two rounds: the followers copy what the leaders computed, then split again; a
            # third round would trade more forward passes for the same work.
            for final in (False, True):
                ready += self._prefill(decoders, leaders)
                for s in followers:
                    self._extend(s)
                if final:
                    break
                leaders, followers = _share(followers)
            if ready:
                tokens = sample(torch.stack([row for _, row in ready]),
                                [s.params for s, _ in ready], [s.generator for s, _ in ready])
                for (s, _), token in zip(ready, tokens, strict=True):
                    self._emit(s, token, outputs[s.id])
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

    def _prefill(self, decoders: list[Sequence], seqs: list[Sequence]
                 ) -> list[tuple[Sequence, torch.Tensor]]:
        """Feed each sequence its next chunk of pending tokens; publish the new KV."""
        ready = []
        sizes = {s.id: min(s.pending, self.prefill_chunk) for s in seqs}
        for group in _group(sorted(seqs, key=lambda s: -sizes[s.id]), sizes):
            _, lo = self.slots.arrange([[s.id for s in decoders], [s.id for s in group]])
            logits = self._forward(lo, group, [sizes[s.id] for s in group])
            self._counts["prefill_tokens"] += sum(sizes[s.id] for s in group)
            for s, row in zip(group, logits, strict=True):
                if s.pending == 0:
                    ready.append((s, row))
                self._publish(s)
        return ready

    def _forward(self, lo: int, seqs: list[Sequence], sizes: list[int]) -> torch.Tensor:
        """Run `seqs` (just arranged into rows lo..) on `sizes` pending tokens each; the logits
        come back in the order of `seqs`."""
        order = sorted(range(len(seqs)), key=lambda g: self.slots.row(seqs[g].id))
        seqs, sizes = [seqs[g] for g in order], [sizes[g] for g in order]
        chunks = [s.tokens[s.computed:s.computed + n] for s, n in zip(seqs, sizes, strict=True)]
        logits = self.runner.forward(lo, [s.computed for s in seqs], chunks)
        for s, n in zip(seqs, sizes, strict=True):
            s.computed += n
            self.slots.set_length(s.id, s.computed)
        self._counts["forwards"] += 1
        back = torch.empty_like(logits)
        back[order] = logits
        return back

    def _emit(self, s: Sequence, token: int, out: StepOutput) -> None:
        """Append a sampled token; report it and any text; finish the sequence if it is done."""
        s.tokens.append(token)
        out.new_tokens.append(token)
        self._counts["tokens_generated"] += 1
        constraint = s.params.constraint
        if constraint is not None:
            constraint.advance(token)
        if token in self.eos and not s.params.ignore_eos:
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


def _group(seqs: list[Sequence], sizes: dict[int, int]) -> list[list[Sequence]]:
    """Split prefills (longest first) into forward passes that waste little on padding."""
    groups: list[list[Sequence]] = []
    for s in seqs:
        if groups:
            group = groups[-1]
            width = sizes[group[0].id]
            if (width - sizes[s.id] <= PAD_SLACK
                    and (len(group) + 1) * width <= MAX_FORWARD_TOKENS):
                group.append(s)
                continue
        groups.append([s])
    return groups


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
