"""A model's worker thread: drains its inbox, steps its backend, applies the step's events.

The loop is `drain the inbox → backend.step() → apply its events`, one iteration per token.
The step itself is schedule → run → postprocess (LocalBackend.step in kernel/llm/backends.py):
the scheduler (kernel/llm/sched) picks the batch within what KV memory allows, the engine runs
it, and the step returns what happened to each generation (kernel/llm/events.py). Only this
module turns events into replies, through each generation's callbacks, which post to the
kernel's loop thread; nothing here touches kernel state directly. torch is imported lazily, by
the backend, so a kernel that serves no model request never loads it.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.config import ModelConfig
from kernel.llm.backends import Unavailable
from kernel.llm.chat import parse_reply
from kernel.llm.events import Delta, Event, Failed, Finished, Started
from kernel.llm.prompt import Prompter, context_tokens, max_prompt_bytes
from kernel.llm.sched import BudgetExceeded
from sdk import abi

log = logging.getLogger("kernel.llm")

RATE_WINDOW_S = 10.0  # live tokens/s is measured over about this long


@dataclass(eq=False)
class Generation:
    """One `llm.chat` in flight, as the worker sees it."""

    id: int
    agent: str
    args: abi.ChatArgs
    arrival: float
    on_delta: Callable[[str], None] | None = None
    on_done: Callable[[abi.ChatResult], None] = lambda result: None
    on_error: Callable[[abi.ErrorCode, str], None] = lambda code, message: None
    prompt_bytes: int = 0  # the size of its text, measured at admission
    cancelled: bool = False  # set by the loop thread; the prompter and worker drop it
    # Worker-side state.
    prompt_ids: list[int] = field(default_factory=list)
    constraint: Any = None  # its grammar's matcher (kernel/llm/grammar.py), if it asks for one
    prepared: bool = False  # tokenized by the prompter (not passed on untouched: no tokenizer)
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    started: float | None = None
    first_token: float | None = None


class ModelWorker(threading.Thread):
    def __init__(self, config: ModelConfig, post: Callable[[Callable[[], None]], None]) -> None:
        super().__init__(name=f"model-{config.name}", daemon=True)
        self.config = config
        self.post = post
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.failed: str | None = None  # why the model cannot serve, once known
        self.failed_code = abi.ErrorCode.EIO  # ENOENT: not in the model store at all
        self.state = "unloaded"  # unloaded | loading | ready | failed
        self.loads = 0  # load attempts (a failed load is tried again once its files change)
        self._failed_files: object = None  # the source's files when the load failed
        self.device: str | None = None
        self.dtype: str | None = None  # what the loaded model computes in (auto resolved)
        self.gens: dict[int, Generation] = {}
        self.published: dict[str, float] = {}  # replaced whole, so readers never see a half
        self._published_at = 0.0
        # Completion tokens as they are generated, and where the rate window starts: readers
        # get tokens/s while a generation streams, not only when one finishes.
        self.generated = 0
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._want_load = threading.Event()
        self._woken = False  # the backend called for the worker since it last published
        self._stopping = False
        self.paused: set[str] = set()  # shared with the backend's scheduler once loaded
        self.ended: set[str] = set()  # agents over for good, forgotten once their calls are gone
        # The context length in tokens (from config.json until the model has loaded) and the
        # longest prompt admitted, in bytes: both read by the loop and the prompter threads.
        self.context = context_tokens(config)
        self.max_prompt_bytes = max_prompt_bytes(config, self.context)
        # Local models tokenize on a thread of their own; remote servers tokenize themselves.
        self.prompter = None if config.remote else Prompter(self)

    # --- the loop thread's side --------------------------------------------------------------

    def submit(self, gen: Generation) -> None:
        self._want_load.set()
        if self.prompter is not None:
            self.prompter.put(gen)
        else:
            self.inbox.put(("submit", gen))

    def cancel(self, gen: Generation) -> None:
        gen.cancelled = True  # for the prompter, or the inbox, if it has not been admitted
        self.inbox.put(("cancel", gen.id))

    def pause(self, agent: str, paused: bool) -> None:
        """Hold (or release) an agent's requests: its scheduler gives them no batch place."""
        self.inbox.put(("pause" if paused else "resume", agent))

    def forget_agent(self, agent: str) -> None:
        """The agent has ended for good: its scheduler drops what it kept about it."""
        if self._want_load.is_set():  # otherwise this model never saw a request, nor will drain
            self.inbox.put(("forget", agent))

    def retry(self) -> bool:
        """After a failed load: if the model's files have changed since (a pull, a repair),
        load it again, without a restart; True if a load was started. Loop thread."""
        if self.failed is None or self._stopping or files_of(self.config) == self._failed_files:
            return False
        self.failed, self.state = None, "loading"
        self.inbox.put(("reload", None))
        return True

    def load_now(self) -> None:
        self._want_load.set()
        self.inbox.put(("wake", None))

    def stop(self) -> None:
        self._stopping = True
        self._want_load.set()
        self.inbox.put(("stop", None))
        if self.prompter is not None:
            self.prompter.stop()

    # --- the worker thread -------------------------------------------------------------------

    def run(self) -> None:
        self._want_load.wait()
        if self._stopping:
            return
        self._try_load()
        while not self._stopping:
            self._drain(block=not self.gens or getattr(self, "backend", None) is None
                        or self.backend.blocking)
            if self._stopping:
                break
            if not self.gens and (self.published.get("generations") or self._woken):
                # The last ones were cancelled, or the backend's state changed while idle (a
                # replica drained or back): say so, no step will.
                self._woken = False
                if getattr(self, "backend", None) is not None and self.failed is None:
                    self._publish(every=0.0)
            elif not self.gens and getattr(self, "backend", None) is not None and not self.failed:
                self.backend.idle()
            if self.gens and self.failed is None:
                try:
                    self._apply(self.backend.step())
                    self._publish()
                except Exception:
                    log.exception("model step failed", extra={"model": self.config.name})
                    for gen in list(self.gens.values()):
                        self._fail(gen, abi.ErrorCode.EIO, "model step failed (logged)")
            if self.ended and self.failed is None:
                self._forget_ended()
        for gen in list(self.gens.values()):
            self._fail(gen, abi.ErrorCode.ECANCELED, "the kernel is shutting down")
        close = getattr(getattr(self, "backend", None), "close", None)
        if close is not None:
            close()

    def _publish(self, every: float = 0.5) -> None:
        now = time.monotonic()
        if now - self._published_at >= every or not self.gens:
            self._published_at = now
            window = self._window
            window.append((now, self.generated))
            while len(window) > 1 and window[1][0] <= now - RATE_WINDOW_S:
                window.popleft()
            self.published = {"generations": len(self.gens), **self.backend.stats(),
                              "generated": self.generated, "window_at": window[0][0],
                              "window_generated": window[0][1], "published_at": now}

    def _try_load(self) -> None:
        self.state, self.loads = "loading", self.loads + 1
        files = files_of(self.config)
        try:
            self.backend = self._load()
            self.backend.sched.paused = self.paused
            self.failed, self.state = None, "ready"
        except BaseException as exc:  # any load failure (a Rust panic too): requests get why
            self.failed_code, self.failed = load_failure(self.config, exc)
            self._failed_files, self.state = files, "failed"
            log.error("model unavailable", extra={"model": self.config.name,
                                                   "reason": self.failed})
        if self.prompter is not None:
            self.prompter.begin(None if self.failed else self.backend.tokenizer)

    def _load(self) -> Any:
        if self.config.remote:
            from kernel.llm.backends import RemoteBackend

            return RemoteBackend(self.config, wake=lambda: self.inbox.put(("wake", None)))
        from kernel.llm.backends import LocalBackend

        backend = LocalBackend(self.config)
        self.device, self.dtype = backend.device, backend.dtype
        if backend.engine.max_len < 1 << 30:  # the engine's own figure, once it is known
            self.context = backend.engine.max_len
            self.max_prompt_bytes = max_prompt_bytes(self.config, self.context)
        return backend

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "stop":
                self._stopping = True
                return
            if kind == "submit":
                self._admit(value)
            elif kind == "wake":
                self._woken = True
            elif kind == "reload":
                self._try_load()
            elif kind == "cancel":
                gen = self.gens.pop(value, None)
                if gen is not None and self.failed is None:
                    self.backend.cancel(gen.id)
            elif kind == "pause":
                self.paused.add(value)
            elif kind == "resume":
                self.paused.discard(value)
            elif kind == "forget" and self.failed is None:
                self.ended.add(value)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, gen: Generation) -> None:
        if gen.cancelled:
            return  # its call has already ended
        if self.failed is not None:
            gen.on_error(self.failed_code, self.failed)
            return
        if self.prompter is not None and not gen.prepared:
            # Passed on while the model was failed; it has loaded again since: tokenize it.
            self.prompter.put(gen)
            return
        try:
            self.backend.admit(gen)
        except BudgetExceeded as exc:
            gen.on_error(abi.ErrorCode.EQUOTA, str(exc))
            return
        except Unavailable as exc:
            gen.on_error(abi.ErrorCode.EAGAIN, str(exc))
            return
        except ValueError as exc:
            gen.on_error(abi.ErrorCode.EINVAL, str(exc))
            return
        self.gens[gen.id] = gen

    def _forget_ended(self) -> None:
        """Forget ended agents whose last calls are gone (their cancels may still be queued)."""
        idle = self.ended - {gen.agent for gen in self.gens.values()}
        if not idle or getattr(self, "backend", None) is None:  # not loaded (yet, again)
            return
        for agent in idle:
            try:
                self.backend.forget_agent(agent)
            except ValueError:  # the scheduler still holds a job of it: a bug, not fatal
                log.exception("forgetting an ended agent failed", extra={"agent": agent})
        self.ended -= idle
        self._publish(every=0.0)

    # --- applying a step's events ------------------------------------------------------------

    def _apply(self, events: list[Event]) -> None:
        gens = self.gens
        for event in events:
            gen = gens.get(event.id)
            if gen is None:
                continue  # cancelled meanwhile
            if type(event) is Delta:  # the common case: tested first, exactly
                gen.completion_tokens += event.tokens
                self.generated += event.tokens
                if gen.first_token is None:
                    gen.first_token = time.monotonic()
                if event.text:
                    gen.text.append(event.text)
                    if gen.on_delta is not None:
                        gen.on_delta(event.text)
            elif isinstance(event, Started):
                if gen.started is None:
                    gen.started, gen.cached_tokens = event.at, event.cached
            elif isinstance(event, Finished):
                self._finish(gen, event)
            elif isinstance(event, Failed):
                self._fail(gen, event.code, event.message)

    def _finish(self, gen: Generation, event: Finished) -> None:
        self.gens.pop(gen.id, None)
        now = time.monotonic()
        full = "".join(gen.text) if event.text is None else event.text
        message = abi.ChatMessage(role="assistant", content=full)
        reason, tool_calls = event.reason, event.tool_calls
        # A reply cut short ("length") is never read as calls: its structure is unfinished.
        if (tool_calls is None and gen.args.tools and gen.args.tool_choice != "none"
                and reason != "length"):
            parsed = parse_reply(full, gen.args.tools)
            tool_calls = parsed.tool_calls
        if tool_calls:
            message = abi.ChatMessage(role="assistant", content=None, tool_calls=tool_calls)
            reason = "tool_calls"
        usage = event.usage or abi.Usage(len(gen.prompt_ids), gen.completion_tokens,
                                         gen.cached_tokens)
        started = gen.started or now
        self._publish_first()
        gen.on_done(abi.ChatResult(
            model=self.config.name, message=message, finish_reason=reason, usage=usage,
            queued_ms=round((started - gen.arrival) * 1000, 3),
            ttft_ms=round(((gen.first_token or now) - gen.arrival) * 1000, 3),
            total_ms=round((now - gen.arrival) * 1000, 3), preemptions=event.preemptions))

    def _fail(self, gen: Generation, code: abi.ErrorCode, message: str) -> None:
        self.gens.pop(gen.id, None)
        self._publish_first()
        gen.on_error(code, message)

    def _publish_first(self) -> None:
        """Publish before answering a call: a caller that reads sys.stats after its answer must
        find the call counted (a fleet's served count lagged an answer, seen in make test)."""
        if getattr(self, "backend", None) is not None and self.failed is None:
            self._publish(every=0.0)


def files_of(config: ModelConfig) -> object:
    """What a local model is loaded from, as (path, size, mtime, inode) rows: a load that
    failed is tried again once these change. None for a remote model."""
    if config.remote:
        return None
    from sdk.models import ModelStore

    source = Path(config.source).expanduser()
    where = source if source.is_absolute() or source.exists() else ModelStore().root / source.name
    try:
        paths = [where, *where.rglob("*")] if where.is_dir() else [where]
        return sorted((str(p), st.st_size, st.st_mtime_ns, st.st_ino)
                      for p in paths for st in [p.stat()])
    except OSError:
        return "unreadable"


def load_failure(config: ModelConfig, exc: BaseException) -> tuple[abi.ErrorCode, str]:
    """The error a model that failed to load answers with: ENOENT if it is not in the store
    (the message names the pull command), else EIO naming the model and how to repair it."""
    from sdk.models import MANIFEST, ModelNotFound, ModelStore

    reason = str(exc) or type(exc).__name__
    if isinstance(exc, ModelNotFound):
        return abi.ErrorCode.ENOENT, reason
    source = Path(config.source).expanduser()
    if source.is_absolute() or source.exists():
        repair = f"repair the files at {source}"
    else:
        store = ModelStore()
        try:
            manifest = json.loads((store.root / source.name / MANIFEST).read_text())
            origin = manifest["source"].get("path")
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            origin = None
        again = store.pull_command(config.source, force=True, source=origin)
        repair = (f"its cache may be damaged: check it with `agentos model verify "
                  f"{config.source}` and pull it again with `{again}`")
    return abi.ErrorCode.EIO, (f"model {config.name!r} failed to load: {reason}; {repair}. "
                               "The next call loads it again once its files change, "
                               "no restart needed")
