"""Where a model's tokens come from: the local batched engine, or a remote OpenAI-compatible
server. Both sit behind the model's scheduler; each `step` returns events (kernel/llm/events.py)
that the model's worker applies."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.config import ModelConfig
from kernel.llm.events import Delta, Event, Failed, Finished, Started
from kernel.llm.remote import Hangup, RemoteError, RemoteModel
from kernel.llm.sched import Job, MemoryPressure, Plan, make_scheduler, token_budget
from sdk import abi

if TYPE_CHECKING:
    from kernel.llm.engine import StepOutput
    from kernel.llm.worker import Generation

log = logging.getLogger("kernel.llm")

# A remote server found broken is probed this long after, then twice as long each time it
# still does not answer, up to the cap.
PROBE_FIRST_S = 0.5
PROBE_MAX_S = 30.0


class Unavailable(Exception):
    """The model cannot take requests now (its server is unhealthy): EAGAIN, retry later."""


def check_files(config: ModelConfig) -> None:
    """A store model that is missing, or has a missing or truncated file, fails here, with
    the error that names its repair, before torch is imported."""
    source = Path(config.source).expanduser()
    if not (source.is_absolute() or source.exists()):
        from sdk.models import ModelStore as Cache

        Cache().checked(config.source)


def load_model(config: ModelConfig) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, device, dtype) for a cache name, a local HF directory or a .gguf
    file; `dtype` is what it computes in, `auto` resolved here, once, for its device."""
    check_files(config)
    source = Path(config.source).expanduser()
    local = source.is_absolute() or source.exists()
    import torch

    from kernel.llm.store import ModelStore, resolve_device, resolve_dtype

    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if local:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kwargs: dict[str, Any] = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
        where = source.parent if kwargs else source
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True,
                                                     dtype=getattr(torch, dtype), **kwargs)
        model.to(device).eval()
    else:
        model, tokenizer = ModelStore().load(config.source, device=device, dtype=dtype)
    return model, tokenizer, device, str(model.dtype).removeprefix("torch.")


class LocalBackend:
    """The continuously batched engine: each `step` is schedule → run → postprocess, one token
    for every generation in the batch (nano-vllm's `LLMEngine.step`)."""

    blocking = False  # there is computing to do whenever a generation is in flight

    def __init__(self, config: ModelConfig) -> None:
        started = time.monotonic()
        self.config = config
        # A model that is not in the store, or whose files are damaged, is refused in
        # milliseconds, before torch and transformers are imported (seconds). Then the engine
        # is imported before the model is loaded: transformers' lazy module is not safe to
        # import from two model threads at once by any other path (two models preloading
        # failed with "cannot import name 'AutoModelForCausalLM'").
        check_files(config)
        from kernel.llm.engine import Engine

        self.model, self.tokenizer, self.device, self.dtype = load_model(config)
        self.engine = Engine(self.model, self.tokenizer, max_batch=config.max_batch,
                             prefill_chunk=config.prefill_chunk, device=self.device,
                             speculate_max_batch=config.speculate_max_batch)
        self.sched = make_scheduler(config.scheduler, budget=token_budget(config.agent_max_tokens),
                                    **config.scheduler_options)
        self.pressure = MemoryPressure(int(config.kv_budget_mb * 2**20), config.max_batch)
        log.info("model loaded", extra={"model": config.name, "device": self.device,
                                        "dtype": self.dtype, "dtype_asked": config.dtype,
                                        "scheduler": config.scheduler,
                                        "seconds": round(time.monotonic() - started, 3)})

    def admit(self, gen: Generation) -> None:
        """Queue a tokenized generation; raises BudgetExceeded or ValueError (nothing queued)."""
        from kernel.llm.grammar import sampling_params

        # gen.prompt_ids and gen.constraint: by the model's prompter thread (kernel/llm/prompt.py).
        params = sampling_params(gen.args, gen.constraint)
        self.sched.submit(Job(gen.id, gen.agent, gen.arrival, len(gen.prompt_ids),
                              gen.args.max_tokens, priority=gen.args.priority), time.monotonic())
        try:
            self.engine.add(gen.id, gen.prompt_ids, params)
        except ValueError:
            self.sched.finish(gen.id, time.monotonic())
            raise

    def cancel(self, gen_id: int) -> None:
        self.engine.cancel(gen_id)
        try:
            self.sched.finish(gen_id, time.monotonic())
        except KeyError:
            pass  # already finished or stopped

    def forget_agent(self, agent: str) -> None:
        self.sched.forget_agent(agent)

    def stats(self) -> dict[str, float]:
        engine = self.engine.stats()
        keys = ("running", "preempted", "queued", "kv_bytes", "kv_slot_bytes", "steps",
                "prefill_tokens", "tokens_generated", "prefix_hit_rate", "preemptions")
        return {**{k: engine[k] for k in keys}, "batch_capacity": self.pressure.capacity,
                "memory_preemptions": self.pressure.preemptions,
                "sched_agents": len(self.sched.agents())}

    def step(self) -> list[Event]:
        """One iteration, one token for every generation in the batch (several for one whose
        speculative draft was accepted): what became of each."""
        # schedule: the policy picks the batch within the places KV memory leaves (sched/).
        plan = self.pressure.schedule(self.sched, time.monotonic(), self._kv_held)
        events = self._switch(plan)
        if not plan.run:
            time.sleep(0.001)  # everything waits on a budget or a slot: do not spin hot
            return events
        # run: one ragged forward pass over exactly the planned batch.
        # A token budget lets an agent's jobs into a step one token each (sched/budget.py), so
        # theirs take no speculative drafts.
        budget = self.sched.budget
        capped = budget.caps() if budget is not None else {}
        outputs = self.engine.step([job.id for job in plan.run],
                                   one_token={job.id for job in plan.run if job.agent in capped})
        # postprocess: account each job's service, report its progress and its end.
        self._postprocess(plan.run, outputs, events)
        return events

    def _kv_held(self) -> int:
        stats = self.engine.stats()
        return stats["kv_slot_bytes"] + stats["kv_snapshot_bytes"]

    def _switch(self, plan: Plan) -> list[Event]:
        """Apply the plan's context switches to the engine; the stopped fail with EQUOTA."""
        for job in plan.drop:
            self.engine.preempt(job.id, keep_kv=False)  # a snapshot held while memory is short
        events: list[Event] = []
        for job in plan.stop:
            self.engine.cancel(job.id)
            events.append(Failed(job.id, abi.ErrorCode.EQUOTA,
                                 f"token budget of {job.agent} is spent"))
        for job in plan.preempt:
            self.engine.preempt(job.id, keep_kv=not plan.recompute)
        return events

    def _postprocess(self, run: list[Job], outputs: dict[int, StepOutput],
                     events: list[Event]) -> None:
        now = time.monotonic()
        account, append = self.sched.account, events.append
        for job in run:
            out = outputs[job.id]
            if not job.prefilled:  # its first step (a prompt has at least one token)
                append(Started(job.id, job.first_run or now, out.reused))
            # A token means the whole prompt is in; otherwise a chunk of it went in this step.
            done = job.prompt_tokens if out.new_tokens else min(out.computed, job.prompt_tokens)
            account(job.id, max(0, done - job.prefilled), len(out.new_tokens), now)
            append(Delta(job.id, out.text_delta, len(out.new_tokens)))
            if out.finished:
                self.sched.finish(job.id, now)
                if out.finish_reason == "error":  # its grammar hit a limit: the caller's fault
                    append(Failed(job.id, abi.ErrorCode.EINVAL, "the output's grammar could "
                                  f"not be followed past this point: {out.error}"))
                else:
                    append(Finished(job.id, out.finish_reason or "stop", job.preemptions))


class RemoteBackend:
    """An OpenAI-compatible server: the scheduler admits requests (up to `max_concurrency` in
    flight, FIFO: a remote stream cannot be paused and resumed, so nothing is preempted); each
    admitted request streams on its own thread, which queues its events for the next `step`
    and calls `wake` so the worker runs it."""

    blocking = True  # the worker waits for the server's events

    def __init__(self, config: ModelConfig, wake: Callable[[], None]) -> None:
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.config = config
        self.remote = RemoteModel(config.source.rstrip("/"), config.remote_model or config.name,
                                  api_key=key, timeout=config.remote_idle_s)
        self.sched = make_scheduler("fifo", budget=token_budget(config.agent_max_tokens))
        self.device = self.dtype = None
        self._wake = wake
        self._args: dict[int, abi.ChatArgs] = {}  # admitted, not yet streaming
        self._cancel: dict[int, threading.Event] = {}  # streaming
        self._reported: queue.SimpleQueue[Event] = queue.SimpleQueue()  # by the stream threads
        # Health: a stream that breaks (EIO, ETIMEDOUT) marks the server unhealthy; requests are
        # refused (EAGAIN) until a probe thread finds it answering again.
        self._health = threading.Lock()
        self.error: str | None = None  # why it is unhealthy; None: healthy
        self.outages = 0  # times it went unhealthy
        self._closed = threading.Event()

    def stats(self) -> dict[str, float]:
        return {"in_flight": len(self._cancel), "waiting": len(self.sched.waiting()),
                "sched_agents": len(self.sched.agents()), "healthy": float(self.error is None),
                "outages": self.outages}

    def close(self) -> None:
        self._closed.set()
        for event in list(self._cancel.values()):
            event.set()

    def admit(self, gen: Generation) -> None:
        if self.error is not None:
            raise Unavailable(f"model {self.config.name!r}: its server {self.config.source} is "
                              f"unhealthy ({self.error}); probing it, retry later")
        self.sched.submit(Job(gen.id, gen.agent, gen.arrival, 0, gen.args.max_tokens,
                              priority=gen.args.priority), time.monotonic())
        self._args[gen.id] = gen.args

    def cancel(self, gen_id: int) -> None:
        self._args.pop(gen_id, None)
        event = self._cancel.pop(gen_id, None)
        if event is not None:
            event.set()
        try:
            self.sched.finish(gen_id, time.monotonic())
        except KeyError:
            pass

    def forget_agent(self, agent: str) -> None:
        self.sched.forget_agent(agent)

    def step(self) -> list[Event]:
        """What the streams did since the last step; then the admitted start streaming."""
        # postprocess what the streams reported.
        events: list[Event] = []
        while True:
            try:
                event = self._reported.get_nowait()
            except queue.Empty:
                break
            if event.id not in self._cancel:
                continue  # cancelled meanwhile
            if isinstance(event, (Finished, Failed)):
                del self._cancel[event.id]
                self.sched.finish(event.id, time.monotonic())
            events.append(event)
        # schedule, and run: start a stream for each request admitted.
        plan = self.sched.schedule(time.monotonic(), self.config.max_concurrency)
        for job in plan.run:
            if job.id in self._cancel:
                continue
            events.append(Started(job.id, time.monotonic()))
            cancelled = self._cancel[job.id] = Hangup()
            threading.Thread(target=self._stream, args=(job.id, self._args.pop(job.id),
                                                        cancelled),
                             name=f"remote-{job.id}", daemon=True).start()
        return events

    def _stream(self, gen_id: int, args: abi.ChatArgs, cancelled: threading.Event) -> None:
        def report(event: Event) -> None:
            self._reported.put(event)
            self._wake()

        try:
            text, reason, calls, usage = self.remote.run(
                args, cancelled, lambda text: report(Delta(gen_id, text)))
        except RemoteError as exc:
            if not (exc.refused or exc.reported):
                self._broken(str(exc))
            report(Failed(gen_id, exc.code, str(exc)))
            return
        except Exception as exc:
            log.exception("remote stream failed", extra={"model": self.config.name})
            self._broken(repr(exc))
            report(Failed(gen_id, abi.ErrorCode.EIO, f"{self.config.source}: {exc!r}"))
            return
        report(Finished(gen_id, reason, text=text, tool_calls=calls or None, usage=usage))

    def _broken(self, why: str) -> None:
        """Mark the server unhealthy (once per outage) and start probing it."""
        with self._health:
            if self.error is not None or self._closed.is_set():
                return
            self.error, self.outages = why, self.outages + 1
        log.warning("remote model unhealthy", extra={"model": self.config.name, "reason": why})
        threading.Thread(target=self._probe, name=f"probe-{self.config.name}",
                         daemon=True).start()

    def _probe(self) -> None:
        wait = PROBE_FIRST_S
        while not self._closed.wait(wait):
            if self.remote.probe(timeout=min(self.remote.timeout, 5.0)):
                with self._health:
                    self.error = None
                log.info("remote model healthy again", extra={"model": self.config.name})
                self._wake()
                return
            wait = min(wait * 2, PROBE_MAX_S)
