"""Speculative decoding by prompt lookup: drafts copied from the sequence, verified in one pass.

Agents copy: a tool result quoted back, a file path, code from an earlier turn. So the tokens
after the latest earlier occurrence of a sequence's last few tokens are a cheap guess of what
comes next (prompt lookup decoding; vLLM's "ngram" speculator). The engine feeds the pending
token and the guess as one chunk of the ragged pass, takes the greedy argmax after every
position, and keeps the longest prefix of the guess the model agrees with plus the model's own
next token; the KV written for the rest is rolled back by shortening the row. For greedy
decoding the tokens emitted are the ones one-token steps would have emitted.
"""

from __future__ import annotations

import numpy as np

# Longest and shortest suffix looked up, longest first: a longer match is a better guess.
MAX_NGRAM = 3
MIN_NGRAM = 1


def propose(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM,
            min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of
    `tokens`, for the largest n in max_ngram..min_ngram that occurs; [] when none does."""
    if k < 1 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens)
    size = len(arr)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = arr[size - n:]
        # Starts j of earlier occurrences: j + n < size, so at least one token follows.
        hits = np.flatnonzero(arr[:size - n] == suffix[0])
        for i in range(1, n):
            hits = hits[arr[hits + i] == suffix[i]]
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


def accept(draft: list[int], greedy: list[int]) -> list[int]:
    """The tokens to emit: `greedy[i]` is the model's choice after the pending token and
    draft[:i]; the draft counts up to its first disagreement, and the model's choice there (or
    after the whole draft) comes with it. Always at least one token."""
    n = 0
    while n < len(draft) and draft[n] == greedy[n]:
        n += 1
    return greedy[:n + 1]
