"""Incremental detokenisation of a generated stream, with stop strings held back and stripped."""

from __future__ import annotations

from typing import Any

# What a tokenizer decodes an incomplete UTF-8 sequence to.
_PARTIAL = "\ufffd"


class TextStream:
    """Turns generated token ids into text deltas; stops at the first stop string, without it.

    Decoding the whole output at every token is quadratic, and decoding a single token is wrong
    for tokenizers that merge bytes or strip a leading space. So each new token decodes a short
    window starting at an earlier token boundary, and only the text past the window's already
    known part is new. A delta is never emitted while the text ends in a partial character, nor
    while its tail could still be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._window = 0  # first token of the decode window
        self._read = 0  # tokens already turned into text
        self.text = ""  # the output so far, complete characters only
        self._sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to hand out."""
        self._ids.append(token)
        known = self._decode(self._ids[self._window:self._read])
        full = self._decode(self._ids[self._window:])
        if len(full) > len(known) and not full.endswith(_PARTIAL):
            self._extend(full[len(known):])
            self._window, self._read = self._read, len(self._ids)
        return self._take(final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended, partial characters included."""
        if not self.stopped and self._read < len(self._ids):
            known = self._decode(self._ids[self._window:self._read])
            full = self._decode(self._ids[self._window:])
            self._extend(full[len(known):])
            self._read = len(self._ids)
        return self._take(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)

    def _extend(self, new: str) -> None:
        if self.stopped:
            return
        # A stop string completed by `new` starts at most len(stop) - 1 characters before it.
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=1) + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        delta = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return delta

    def _held(self) -> int:
        """Length of the longest tail of the text that could grow into a stop string."""
        tail = self.text[self._sent:]
        for n in range(min(len(tail), max((len(s) for s in self._stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self._stop):
                return n
        return 0
