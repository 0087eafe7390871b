"""Where a model's tokens come from: the local batched engine, or a remote OpenAI-compatible
server. Both sit behind the model's scheduler; each `step` returns events (kernel/llm/events.py)
that the model's worker applies."""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.config import ModelConfig
from kernel.llm.events import Delta, Event, Failed, Finished, Started
from kernel.llm.fleet import Replica, Router
from kernel.llm.remote import Hangup, RemoteError, RemoteModel
from kernel.llm.sched import Job, MemoryPressure, Plan, make_scheduler, token_budget
from sdk import abi

if TYPE_CHECKING:
    from kernel.llm.engine import StepOutput
    from kernel.llm.worker import Generation

log = logging.getLogger("kernel.llm")

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

        from sdk.models import loading

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kwargs: dict[str, Any] = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
        where = source.parent if kwargs else source
        with loading:  # one model built at a time: see sdk.models.loading
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
        from kernel.llm.engine.packed import fuse_projections, pack_linears

        self.model, self.tokenizer, self.device, self.dtype = load_model(config)
        # Projections that read the same input fused, then weights laid out once for oneDNN,
        # each where the products stay bit for bit the same (packing: bfloat16 on a CPU):
        # 0.5-0.7x the matmul time at a few agents.
        fused = fuse_projections(self.model) if config.pack_weights else 0
        packed = pack_linears(self.model) if config.pack_weights else 0
        self.engine = Engine(self.model, self.tokenizer, max_batch=config.max_batch,
                             prefill_chunk=config.prefill_chunk, device=self.device,
                             speculate_max_batch=config.speculate_max_batch,
                             prefix_cache_bytes=int(config.prefix_cache_mb * 2**20))
        self.sched = make_scheduler(config.scheduler, budget=token_budget(config.agent_max_tokens),
                                    **config.scheduler_options)
        self.pressure = MemoryPressure(int(config.kv_budget_mb * 2**20), config.max_batch)
        log.info("model loaded", extra={"model": config.name, "device": self.device,
                                        "dtype": self.dtype, "dtype_asked": config.dtype,
                                        "scheduler": config.scheduler,
                                        "fused_linears": fused, "packed_linears": packed,
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

    def idle(self) -> None:
        """No generation in flight (called about every 0.5 s while so)."""
        self.engine.idle()

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
    """A fleet of OpenAI-compatible servers (kernel/llm/fleet.py). The scheduler admits requests
    (FIFO: a remote stream cannot be paused and resumed, so nothing is preempted) up to what the
    healthy replicas can stream at once; the router picks each one's replica; each streams on
    its own thread, which queues what it got for the next `step` and calls `wake` so the worker
    runs it. A call whose replica fails is failed over (`_failover`): retried elsewhere if
    nothing was streamed yet, resumed elsewhere if it was greedy, else failed, typed, saying
    how much was delivered. Never a silent truncation."""

    blocking = True  # the worker waits for the servers' events

    def __init__(self, config: ModelConfig, wake: Callable[[], None]) -> None:
        self.config = config
        replicas = []
        for i, rc in enumerate(config.fleet()):
            key = os.environ.get(rc.api_key_env) if rc.api_key_env else None
            remote = RemoteModel(rc.url, config.remote_model or config.name, api_key=key,
                                 timeout=config.remote_idle_s, max_connections=rc.max_concurrency)
            replicas.append(Replica(i, remote, rc.max_concurrency))
        self.router = Router(config.name, replicas, wake, config.health_interval_s,
                             config.affinity)
        self.sched = make_scheduler("fifo", budget=token_budget(config.agent_max_tokens))
        self.device = self.dtype = None
        self._wake = wake
        self._admitted: dict[int, Flight] = {}  # admitted, not yet scheduled
        self._flights: dict[int, Flight] = {}  # scheduled: streaming or waiting for a replica
        self._ready: collections.deque[Flight] = collections.deque()  # waiting for a replica
        self._reported: queue.SimpleQueue[tuple[int, int, str, Any]] = queue.SimpleQueue()
        self.failovers = 0  # calls retried or resumed on another replica

    @property
    def error(self) -> str | None:
        """Why no call can be taken (every replica drained); None while one is healthy."""
        return self.router.error()

    @property
    def outages(self) -> int:
        return self.router.outages()

    def stats(self) -> dict[str, float]:
        return {"in_flight": len(self._flights), "waiting": len(self.sched.waiting()),
                "sched_agents": len(self.sched.agents()), "healthy": float(self.error is None),
                "outages": self.outages, "failovers": self.failovers,
                **self.router.figures()}

    def idle(self) -> None:
        pass  # the servers hold their own memory

    def close(self) -> None:
        for flight in self._flights.values():
            if flight.hangup is not None:
                flight.hangup.set()
        self.router.close()

    def admit(self, gen: Generation) -> None:
        if self.error is not None:
            where = (f"its server {self.config.source} is" if len(self.router.replicas) == 1
                     else "every replica is")
            raise Unavailable(f"model {self.config.name!r}: {where} unhealthy ({self.error}); "
                              "probing, retry later")
        self.sched.submit(Job(gen.id, gen.agent, gen.arrival, 0, gen.args.max_tokens,
                              priority=gen.args.priority), time.monotonic())
        self._admitted[gen.id] = Flight(gen.id, gen.agent, gen.args)

    def cancel(self, gen_id: int) -> None:
        self._admitted.pop(gen_id, None)
        flight = self._flights.pop(gen_id, None)
        if flight is not None and flight.hangup is not None:
            flight.hangup.set()
            self.router.end(flight.replica, served=False)
        try:
            self.sched.finish(gen_id, time.monotonic())
        except KeyError:
            pass

    def forget_agent(self, agent: str) -> None:
        self.sched.forget_agent(agent)
        self.router.forget_agent(agent)

    def step(self) -> list[Event]:
        """What the streams did since the last step; then the scheduled get a replica each."""
        events: list[Event] = []
        while True:  # postprocess what the streams reported
            try:
                gen_id, attempt, kind, value = self._reported.get_nowait()
            except queue.Empty:
                break
            flight = self._flights.get(gen_id)
            if flight is None or flight.attempt != attempt:
                continue  # cancelled meanwhile, or an attempt already failed over
            if kind == "delta":
                flight.sent.append(value)
                events.append(Delta(gen_id, value))
                continue
            self.router.end(flight.replica, served=kind == "done")
            flight.hangup = None  # its stream is over: nothing to cancel until the next
            if kind == "done":
                events.append(self._finished(flight, *value))
            else:
                self._failover(flight, value, events)
        # schedule: the policy picks what runs, within what the healthy replicas can take.
        plan = self.sched.schedule(time.monotonic(), self.router.capacity())
        for job in plan.run:
            flight = self._admitted.pop(job.id, None)
            if flight is None:
                continue
            events.append(Started(job.id, time.monotonic()))
            self._flights[job.id] = flight
            self._ready.append(flight)
        # route and run: each waiting call streams on the replica the router picks.
        waiting, self._ready = self._ready, collections.deque()
        for flight in waiting:
            if flight.id not in self._flights:
                continue  # cancelled
            replica = self.router.pick(flight.agent, avoid=flight.tried)
            if replica is not None:
                self._launch(flight, replica)
            elif self.router.usable(avoid=flight.tried):
                self._ready.append(flight)  # a healthy replica is full: wait for room
            else:
                self._end(flight, events, Failed(flight.id, *flight.failure(self.config.name)))
        return events

    def _launch(self, flight: Flight, replica: Replica) -> None:
        self.router.begin(replica, flight.agent)
        flight.replica, flight.attempt = replica, flight.attempt + 1
        flight.hangup = Hangup()
        threading.Thread(target=self._stream, args=(flight.id, flight.attempt, replica.remote,
                                                    flight.request(), flight.hangup),
                         name=f"remote-{flight.id}", daemon=True).start()

    def _end(self, flight: Flight, events: list[Event], event: Event) -> None:
        self._flights.pop(flight.id, None)
        self.sched.finish(flight.id, time.monotonic())
        events.append(event)

    def _finished(self, flight: Flight, text: str, reason: str, calls: list[abi.ToolCall],
                  usage: abi.Usage) -> Finished:
        self._flights.pop(flight.id, None)
        self.sched.finish(flight.id, time.monotonic())
        if flight.base:  # resumed: what earlier replicas streamed comes first
            text = "".join(flight.sent[:flight.base]) + text
            usage = abi.Usage(usage.prompt_tokens, usage.completion_tokens + flight.base)
        return Finished(flight.id, reason, text=text, tool_calls=calls or None, usage=usage)

    def _failover(self, flight: Flight, exc: BaseException, events: list[Event]) -> None:
        """The call's replica failed it: retry it elsewhere if nothing was streamed, resume it
        elsewhere if it is greedy, else fail it saying how much the caller got."""
        replica = flight.replica
        if not isinstance(exc, RemoteError):
            log.error("remote stream failed", exc_info=exc, extra={"model": self.config.name})
            exc = RemoteError(f"{replica.url}: {exc!r}")
        flight.error = exc
        if exc.refused or exc.reported:  # the request itself, or the server said it failed
            code, message = exc.code, str(exc)
            if flight.sent:  # say what the caller got (a refused resume is not its EINVAL)
                how = " and resuming it on another replica failed" if flight.base else ""
                code = abi.ErrorCode.EIO
                message += (f"; {len(flight.sent)} pieces (about as many tokens) were already "
                            f"streamed{how}: the reply is cut short")
            self._end(flight, events, Failed(flight.id, code, message))
            return
        self.router.failed(replica, str(exc))
        flight.tried.add(replica)
        if len(flight.sent) >= flight.args.max_tokens:  # it broke after its last token
            text = "".join(flight.sent)
            self._end(flight, events, Finished(flight.id, "length", text=text, usage=abi.Usage(
                0, len(flight.sent))))
            return
        if flight.sent and not flight.resumable():
            self._end(flight, events, Failed(flight.id, *flight.failure(self.config.name)))
            return
        self.failovers += 1
        flight.base = len(flight.sent)
        log.warning("remote call failed over", extra={
            "model": self.config.name, "replica": replica.url, "reason": str(exc),
            "streamed": flight.base, "how": "resume" if flight.base else "retry"})
        self._ready.append(flight)

    def _stream(self, gen_id: int, attempt: int, remote: RemoteModel, args: abi.ChatArgs,
                hangup: Hangup) -> None:
        def report(kind: str, value: Any) -> None:
            self._reported.put((gen_id, attempt, kind, value))
            self._wake()

        try:
            result = remote.run(args, hangup, lambda text: report("delta", text))
        except Exception as exc:  # RemoteError, or a bug: failed over on the worker thread
            report("error", exc)
            return
        report("done", result)


class Flight:
    """One call of a remote model, across the replicas it runs on (worker thread only)."""

    def __init__(self, id: int, agent: str, args: abi.ChatArgs) -> None:
        self.id = id
        self.agent = agent
        self.args = args
        self.replica: Replica | None = None  # where it streams now
        self.hangup: Hangup | None = None  # its stream's cancellation
        self.attempt = 0  # streams started; reports of earlier ones are stale
        self.sent: list[str] = []  # text pieces streamed to the caller, over all attempts
        self.base = 0  # pieces streamed before the current attempt (a resume's prefix)
        self.tried: set[Replica] = set()  # replicas it failed on: not tried again
        self.error: RemoteError | None = None  # the last failure

    def resumable(self) -> bool:
        """Whether another replica can go on from what was streamed with the output the first
        would have given: greedy, and unconstrained (a grammar would start over on the
        continuation), so the continuation is the same function of the same text; and that
        text whole characters (a U+FFFD stands for bytes of a character cut between tokens,
        which the server would read back as other tokens)."""
        a = self.args
        return (a.temperature == 0 and not a.tools and a.json_schema is None and a.regex is None
                and a.choice is None and a.response_format == "text"
                and not any("\ufffd" in piece for piece in self.sent))

    def request(self) -> abi.ChatArgs:
        """What the next attempt asks: the call itself, or, once text was streamed, the call
        plus that text as the assistant's unfinished message, to be continued."""
        if not self.sent:
            return self.args
        partial = abi.ChatMessage(role="assistant", content="".join(self.sent))
        return msgspec.structs.replace(
            self.args, messages=[*self.args.messages, partial], continue_final=True,
            max_tokens=max(1, self.args.max_tokens - len(self.sent)))

    def failure(self, model: str) -> tuple[abi.ErrorCode, str]:
        """The error that ends it: its last replica's, saying what the caller already got."""
        exc = self.error
        if exc is None:
            return abi.ErrorCode.EAGAIN, f"model {model!r}: no healthy replica; retry later"
        code, message = exc.code, str(exc)
        if len(self.tried) > 0 and not self.sent:
            message += "; no other healthy replica to retry it on"
        if self.sent:
            why = ("and no other healthy replica to resume it on" if self.resumable() else
                   "and only greedy, unconstrained calls whose text so far is whole "
                   "characters are resumed elsewhere")
            message += (f"; {len(self.sent)} pieces (about as many tokens) were already "
                        f"streamed, {why}: the reply is cut short")
        return code, message
