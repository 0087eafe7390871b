"""Bounding what a prompt costs before the model sees it: its bytes at admission, its tokens on a
thread of their own.

Every stage of a prompt's way in costs in proportion to its size: the chat template, the
tokenizer (about 1 s and hundreds of MB per MB of text with a fast tokenizer) and the token
list. Tokenized on the model's worker thread, four 10 MB prompts held every other agent's
request for 30 s and the kernel at 3.8 GB, only to fail the context check afterwards. So:

- `llm.chat` counts the prompt's text in UTF-8 bytes on the loop thread (stopping as soon as
  it is over) and refuses anything over the model's `max_prompt_bytes` with EINVAL before it is
  queued: by default PROMPT_BYTES_PER_TOKEN per token of the model's context, several times
  the 3-5 bytes a token of text or code takes, so a prompt refused by bytes would not have
  fit the context anyway.
- What passes is tokenized by the model's `Prompter` thread, never its worker: fast tokenizers
  release the GIL while they encode, so the worker keeps stepping meanwhile. Prompts are taken
  smallest first (their cost is known from their bytes), so a short prompt waits for at most
  the one being tokenized, whatever a neighbour has queued. A prompt with no room left in the
  context is refused there (EINVAL) and never reaches the worker. The structure a prompt asks
  its output to match (a JSON Schema, tools, a regex) is compiled there too
  (kernel/llm/grammar.py); one that cannot be is refused (EINVAL).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.config import ModelConfig
from kernel.llm.chat import render
from kernel.llm.grammar import GrammarError, Grammars
from sdk import abi

if TYPE_CHECKING:
    from kernel.llm.worker import Generation, ModelWorker

log = logging.getLogger("kernel.llm")

PROMPT_BYTES_PER_TOKEN = 16
DEFAULT_CONTEXT_TOKENS = 32768  # when the model does not say (remote servers, .gguf files)


def context_tokens(config: ModelConfig) -> int | None:
    """The model's context length from its config.json, without loading it; None if unknown."""
    if config.remote:
        return None
    source = Path(config.source).expanduser()
    if not (source.is_absolute() or source.exists()):
        from kernel.llm.store import ModelStore, StoreError

        try:
            source = ModelStore().path(config.source)
        except (StoreError, ValueError):  # not pulled, or not a name a model can have
            return None
    try:
        data = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for table in (data, data.get("text_config") or {}):
        value = table.get("max_position_embeddings") if isinstance(table, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def max_prompt_bytes(config: ModelConfig, context: int | None) -> int:
    return config.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * (context or DEFAULT_CONTEXT_TOKENS)


def _utf8_len(text: str, room: int) -> int:
    """`text`'s UTF-8 length, or any number over `room` once it is certainly over."""
    if text.isascii() or len(text) > room:  # a character is at least one byte
        return len(text)
    return len(text.encode())


def prompt_bytes(args: abi.ChatArgs, limit: int) -> int:
    """UTF-8 bytes of the text `args` puts in the prompt; once past `limit`, counting stops and
    the count so far (over `limit`) is returned."""
    total = 0
    for m in args.messages:
        texts = [m.content or "", m.name or "", m.tool_call_id or ""]
        for call in m.tool_calls or ():
            texts += [call.function.name, call.function.arguments]
        for text in texts:
            total += _utf8_len(text, limit - total)
            if total > limit:
                return total
    # The structure asked for costs its compile on the prompter thread: it counts like text.
    for extra in (args.tools, args.json_schema, args.regex, args.choice):
        if extra is not None:
            total += len(msgspec.json.encode(extra))
    return total


class Prompter(threading.Thread):
    """A model's tokenizer thread: renders and tokenizes prompts, smallest first, and hands each
    to the worker's inbox (or fails it with EINVAL)."""

    def __init__(self, worker: ModelWorker) -> None:
        super().__init__(name=f"prompts-{worker.config.name}", daemon=True)
        self.worker = worker
        self.tokenizer: Any = None  # a copy of the model's own, once it has loaded
        self.grammars: Grammars | None = None  # the structures asked for, compiled once each
        self._heap: list[tuple[int, int, Generation]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._stopping = False
        self._begun = False

    def put(self, gen: Generation) -> None:
        with self._ready:
            heapq.heappush(self._heap, (gen.prompt_bytes, next(self._order), gen))
            self._ready.notify()

    def begin(self, tokenizer: Any) -> None:
        """Start, once the model has loaded (or failed to: `tokenizer` None hands everything
        to the worker, which answers with the reason)."""
        # The worker's copy decodes while this one encodes: a tokenizer object used by two
        # threads at once can fail ("Already borrowed") if either call reconfigures it.
        # Called again when a model that failed to load is loaded again (its files repaired).
        tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.grammars = Grammars(tokenizer) if tokenizer is not None else None
        self.tokenizer = tokenizer
        if not self._begun:
            self._begun = True
            self.start()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
            left, self._heap = self._heap, []
        for *_, gen in left:
            gen.on_error(abi.ErrorCode.ECANCELED, "the kernel is shutting down")

    def run(self) -> None:
        while True:
            with self._ready:
                while not self._heap and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                *_, gen = heapq.heappop(self._heap)
            if not gen.cancelled:
                self._prepare(gen)

    def _prepare(self, gen: Generation) -> None:
        if self.tokenizer is None or self.grammars is None:
            self.worker.inbox.put(("submit", gen))
            return
        from jinja2 import TemplateError

        try:
            # Compiled here, off the worker: a new grammar costs ~1 ms (more for a large one).
            gen.constraint = self.grammars.matcher(gen.args)
        except GrammarError as exc:
            log.info("structure refused", extra={"agent": gen.agent, "reason": str(exc)})
            gen.on_error(abi.ErrorCode.EINVAL, f"cannot enforce the requested structure: {exc}")
            return
        try:
            ids = render(self.tokenizer, gen.args)
        except (TemplateError, ValueError, TypeError) as exc:  # e.g. roles out of order
            log.info("prompt refused", extra={"agent": gen.agent, "reason": str(exc)})
            gen.on_error(abi.ErrorCode.EINVAL, f"the model's chat template refused these "
                                               f"messages: {exc}")
            return
        except Exception:
            log.exception("tokenizing a prompt failed", extra={"agent": gen.agent})
            gen.on_error(abi.ErrorCode.EIO, "tokenizing the prompt failed (logged)")
            return
        context = self.worker.context
        if context is not None and len(ids) >= context:
            gen.on_error(abi.ErrorCode.EINVAL, f"prompt of {len(ids)} tokens leaves no room in "
                                               f"the model's {context}-token context")
            return
        gen.prompt_ids, gen.prepared = ids, True
        self.worker.inbox.put(("submit", gen))
