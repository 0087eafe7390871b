"""Where a model's tokens come from: the local batched engine, or a remote OpenAI-compatible
server. Both sit behind the model's scheduler and report through its worker."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.config import ModelConfig
from kernel.llm.remote import RemoteError, RemoteModel
from kernel.llm.sched import Job, make_scheduler
from kernel.llm.worker import make_budget
from sdk import abi

if TYPE_CHECKING:
    from kernel.llm.worker import Generation, ModelWorker

log = logging.getLogger("kernel.llm")


def load_model(config: ModelConfig) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) for a cache name, a local HF directory or a .gguf file."""
    import torch

    from kernel.llm.store import ModelStore, resolve_device

    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    device = resolve_device(config.device)
    source = Path(config.source).expanduser()
    if source.is_absolute() or source.exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}.get(config.dtype, "auto")
        kwargs: dict[str, Any] = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
        where = source.parent if kwargs else source
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=dtype,
                                                     **kwargs)
        model.to(device).eval()
        return model, tokenizer, device
    model, tokenizer = ModelStore().load(config.source, device=device, dtype=config.dtype)
    return model, tokenizer, device


class LocalBackend:
    """The continuously batched engine, one scheduler step per token."""

    blocking = False  # there is computing to do whenever a generation is in flight

    def __init__(self, config: ModelConfig) -> None:
        from kernel.llm.engine import Engine

        started = time.monotonic()
        self.config = config
        self.model, self.tokenizer, self.device = load_model(config)
        self.engine = Engine(self.model, self.tokenizer, max_batch=config.max_batch,
                             prefill_chunk=config.prefill_chunk, device=self.device)
        self.sched = make_scheduler(config.scheduler, budget=make_budget(config),
                                    **config.scheduler_options)
        self.kv_budget = int(config.kv_budget_mb * 2**20)
        self.capacity = config.max_batch
        self.memory_preemptions = 0
        log.info("model loaded", extra={"model": config.name, "device": self.device,
                                        "dtype": config.dtype, "scheduler": config.scheduler,
                                        "seconds": round(time.monotonic() - started, 3)})

    def admit(self, worker: ModelWorker, gen: Generation) -> None:
        from kernel.llm.grammar import sampling_params

        # gen.prompt_ids and gen.constraint: by the model's prompter thread (kernel/llm/prompt.py).
        params = sampling_params(gen.args, gen.constraint)
        gen.job = Job(gen.id, gen.agent, gen.arrival, len(gen.prompt_ids), gen.args.max_tokens,
                      priority=gen.args.priority)
        self.sched.submit(gen.job, time.monotonic())
        try:
            self.engine.add(gen.id, gen.prompt_ids, params)
        except ValueError:
            self.sched.finish(gen.id, time.monotonic())
            raise

    def forget(self, worker: ModelWorker, gen: Generation) -> None:
        self.engine.cancel(gen.id)
        try:
            self.sched.finish(gen.id, time.monotonic())
        except KeyError:
            pass  # already finished or stopped

    def stats(self) -> dict[str, float]:
        engine = self.engine.stats()
        keys = ("running", "preempted", "queued", "kv_bytes", "kv_slot_bytes", "steps",
                "prefill_tokens", "tokens_generated", "prefix_hit_rate", "preemptions")
        return {**{k: engine[k] for k in keys}, "batch_capacity": self.capacity,
                "memory_preemptions": self.memory_preemptions}

    def _pressure(self) -> bool:
        """Adjust the batch size to the KV budget; True while memory is short.

        A context switch for time (a slice, a higher priority) keeps a KV snapshot: on a CPU
        recomputing costs a whole prefill. A switch for memory drops the KV and recomputes on
        resume, since a snapshot would keep the very memory that is short."""
        if not self.kv_budget:
            return False
        stats = self.engine.stats()
        held = stats["kv_slot_bytes"] + stats["kv_snapshot_bytes"]
        running = len(self.sched.running())
        if held > self.kv_budget:
            self.capacity = max(1, min(self.capacity, running) - 1)
            for job in self.sched.waiting():
                self.engine.preempt(job.id, keep_kv=False)  # drop snapshots held by waiters
            return True
        if held < self.kv_budget * 0.8:
            self.capacity = min(self.config.max_batch, self.capacity + 1)
        return False

    def step(self, worker: ModelWorker) -> None:
        short = self._pressure()
        now = time.monotonic()
        plan = self.sched.schedule(now, self.capacity)
        for job in plan.stop:
            self.engine.cancel(job.id)
            gen = worker.gens.get(job.id)
            if gen is not None:
                worker._fail(gen, abi.ErrorCode.EQUOTA, f"token budget of {job.agent} is spent")
        for job in plan.preempt:
            self.engine.preempt(job.id, keep_kv=not short)
            self.memory_preemptions += short
        if not plan.run:
            time.sleep(0.001)  # everything waits on a budget or a slot: do not spin hot
            return
        outputs = self.engine.step([job.id for job in plan.run])
        now = time.monotonic()
        for job in plan.run:
            gen = worker.gens.get(job.id)
            out = outputs.get(job.id)
            if gen is None or out is None:
                continue
            if gen.started is None:
                gen.started = job.first_run or now
                gen.cached_tokens = out.reused
            # A token means the whole prompt is in; otherwise a chunk of it went in this step.
            done = job.prompt_tokens if out.new_tokens else min(out.computed, job.prompt_tokens)
            self.sched.account(job.id, max(0, done - job.prefilled), 1 if out.new_tokens else 0,
                               now)
            gen.completion_tokens += len(out.new_tokens)
            worker.delta(gen, out.text_delta)
            if out.finished:
                self.sched.finish(job.id, now)
                if out.finish_reason == "error":  # its grammar hit a limit: the caller's fault
                    worker._fail(gen, abi.ErrorCode.EINVAL, f"the output's grammar could not be "
                                 f"followed past token {gen.completion_tokens}: {out.error}")
                else:
                    worker.finish(gen, out.finish_reason or "stop", preemptions=job.preemptions)


class RemoteBackend:
    """An OpenAI-compatible server: the scheduler admits requests (up to `max_concurrency` in
    flight, FIFO: a remote stream cannot be paused and resumed, so nothing is preempted); each
    admitted request streams on its own thread and reports through the worker's inbox."""

    blocking = True  # the worker waits for the server's events

    def __init__(self, config: ModelConfig) -> None:
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.config = config
        self.remote = RemoteModel(config.source.rstrip("/"), config.remote_model or config.name,
                                  api_key=key)
        self.sched = make_scheduler("fifo", budget=make_budget(config))
        self.device = None
        self._cancel: dict[int, threading.Event] = {}

    def stats(self) -> dict[str, float]:
        return {"in_flight": len(self._cancel), "waiting": len(self.sched.waiting())}

    def admit(self, worker: ModelWorker, gen: Generation) -> None:
        gen.job = Job(gen.id, gen.agent, gen.arrival, 0, gen.args.max_tokens,
                      priority=gen.args.priority)
        self.sched.submit(gen.job, time.monotonic())

    def forget(self, worker: ModelWorker, gen: Generation) -> None:
        event = self._cancel.pop(gen.id, None)
        if event is not None:
            event.set()
        try:
            self.sched.finish(gen.id, time.monotonic())
        except KeyError:
            pass

    def step(self, worker: ModelWorker) -> None:
        plan = self.sched.schedule(time.monotonic(), self.config.max_concurrency)
        for job in plan.run:
            gen = worker.gens.get(job.id)
            if gen is None or job.id in self._cancel:
                continue
            gen.started = time.monotonic()
            cancelled = self._cancel[job.id] = threading.Event()
            threading.Thread(target=self._stream, args=(worker, gen, cancelled),
                             name=f"remote-{job.id}", daemon=True).start()

    def _stream(self, worker: ModelWorker, gen: Generation, cancelled: threading.Event) -> None:
        def on_delta(text: str) -> None:
            worker.inbox.put(("call", lambda: worker.delta(gen, text)))

        try:
            text, reason, calls, usage = self.remote.run(gen.args, cancelled, on_delta)
        except RemoteError as exc:
            message = str(exc)
            code = abi.ErrorCode.EINVAL if exc.refused else abi.ErrorCode.EIO
            worker.inbox.put(("call", lambda: self._failed(worker, gen, message, code)))
            return
        worker.inbox.put(("call", lambda: self._finished(worker, gen, text, reason, calls,
                                                          usage)))

    def _finished(self, worker: ModelWorker, gen: Generation, text: str, reason: str,
                  calls: list[abi.ToolCall], usage: abi.Usage) -> None:
        if self._cancel.pop(gen.id, None) is None:
            return  # cancelled meanwhile
        self.sched.finish(gen.id, time.monotonic())
        gen.completion_tokens = usage.completion_tokens
        gen.prompt_ids = [0] * usage.prompt_tokens  # the server counted them; keep the count
        worker.finish(gen, reason, text=text, tool_calls=calls or None)

    def _failed(self, worker: ModelWorker, gen: Generation, message: str,
                code: abi.ErrorCode) -> None:
        if self._cancel.pop(gen.id, None) is None:
            return
        self.sched.finish(gen.id, time.monotonic())
        worker._fail(gen, code, message)
