"""The LLM core, loop-thread side: `llm.*` syscalls in, one worker thread per model.

The dispatch loop never runs a model. `llm.chat` admits a call first (a prompt under the model's
`max_prompt_bytes`, fewer than `agent_max_concurrent` of the caller's calls in flight: checks
that cost no tokenizing, before anything is queued), then parks it and hands a `Generation` to
the model's worker (through its prompter thread, kernel/llm/prompt.py); the worker posts deltas
and the final result back (`Calls.post`), and the loop sends them. Cancelling the call (the
agent asks, dies, or its deadline passes) tells the worker to drop the generation and free its
memory.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from kernel.call import Call, Calls, Fault
from kernel.llm.prompt import DEFAULT_CONTEXT_TOKENS, PROMPT_BYTES_PER_TOKEN, prompt_bytes
from kernel.llm.worker import RATE_WINDOW_S, Generation, ModelWorker
from sdk import abi

if TYPE_CHECKING:
    from kernel.config import Config

log = logging.getLogger("kernel.llm")


class LLMCore:
    def __init__(self, *, calls: Calls, config: Config) -> None:
        self.calls = calls
        self.config = config
        self.workers: dict[str, ModelWorker] = {
            name: ModelWorker(model, calls.post) for name, model in config.models.items()}
        # Other names for served models (config `[aliases]` and each model's `aliases`), and
        # names that pick one per call (`[routes.NAME]`), with the calls each route sent where.
        self.aliases = config.check_routes()
        self.routes = config.routes
        self.routed: dict[str, Counter[str]] = {name: Counter() for name in self.routes}
        self._ids = itertools.count(1)
        # llm.chat calls in flight by (model, principal): counted from admission to the reply
        # or failure, so a cap holds whatever stage (prompter, scheduler, engine) they are in.
        self.in_flight: Counter[tuple[str, str]] = Counter()

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()
            if self.config.preload:
                worker.load_now()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for worker in self.workers.values():
            worker.join(timeout=10)

    def resolve(self, name: str | None, args: abi.ChatArgs | None = None) -> str:
        """The served model a requested name means: none is the default model, an alias the
        model it names, a route the model its rules pick for `args` (without args, the route's
        own name); any other name stays as it is (`chat` refuses it, listing the served).
        Every door resolves here, before the capability check, so `llm.chat@llm/NAME` and the
        accounts always see the served name: an alias or a route never widens a right."""
        if name is None:
            return self.config.default_model or ""
        if name in self.workers:
            return name
        route = self.routes.get(name)
        if route is not None and args is not None:
            return route.pick(prompt_bytes(args, route.prompt_limit), args.max_tokens)
        return self.aliases.get(name, name)

    def known(self, name: str) -> bool:
        """Whether calls may name `name`: a served model, an alias or a route."""
        return name in self.workers or name in self.aliases or name in self.routes

    def served(self) -> str:
        """What is served, for an error message: each model with its aliases."""
        names = []
        for name in self.workers:
            aliases = sorted(a for a, target in self.aliases.items() if target == name)
            names.append(f"{name} (alias {', '.join(aliases)})" if aliases else name)
        names += [f"{name} (route)" for name in self.routes]
        return ", ".join(names) or "none"

    def models(self) -> list[abi.ModelInfo]:
        default = self.config.default_model
        return [abi.ModelInfo(name=name, backend="openai" if w.config.remote else "local",
                              device=w.device, dtype=w.config.dtype, default=name == default,
                              aliases=sorted(a for a, t in self.aliases.items() if t == name),
                              running_dtype=w.dtype, stored=w.config.stored)
                for name, w in self.workers.items()] + [
                abi.ModelInfo(name=name, backend="route",
                              picks=list(dict.fromkeys(r.model for r in route.rules)))
                for name, route in self.routes.items()]

    def dependencies(self) -> list[abi.DependencyInfo]:
        """Each model's state: unloaded, loading, ready, failed (its load; the reason), or
        unhealthy (a remote server that broke, probed until it answers)."""
        out = []
        for name, w in self.workers.items():
            backend = getattr(w, "backend", None)
            outage = getattr(backend, "error", None) if w.state == "ready" else None
            restarts = getattr(backend, "outages", 0) if w.config.remote else max(0, w.loads - 1)
            out.append(abi.DependencyInfo("model", name, "unhealthy" if outage else w.state,
                                          restarts, outage or w.failed))
            router = getattr(backend, "router", None)
            if router is not None and len(router.replicas) > 1:  # a fleet: each replica too
                out += [abi.DependencyInfo("replica", f"{name}#{r.index}",
                                           "ready" if r.healthy else "unhealthy", r.outages,
                                           f"{r.url}: {r.error}" if r.error else r.url)
                        for r in router.replicas]
        return out

    def stats(self) -> dict[str, dict[str, float]]:
        """What each worker last published (it publishes; the loop never reads the engine),
        with `tokens_per_s`: completion tokens generated over the last ~10 s, counted as they
        are generated, so it is live while a generation streams and falls to 0 when idle."""
        now = time.monotonic()
        out = {}
        for name, w in self.workers.items():
            row = dict(w.published)
            if not row:
                continue
            span = now - row.pop("window_at", now)
            made = row.get("generated", 0) - row.pop("window_generated", 0)
            quiet = now - row.pop("published_at", now)  # nothing was generated since
            row["tokens_per_s"] = made / span if span >= 0.5 and quiet <= RATE_WINDOW_S else 0.0
            out[name] = row
        for name, picked in self.routed.items():  # route.MODEL: the calls it sent there
            out[name] = {"calls": float(sum(picked.values())),
                         **{f"route.{model}": float(n) for model, n in picked.items()}}
        return out

    def chat(self, call: Call, args: abi.ChatArgs) -> Any:
        name = self.resolve(args.model, args)
        worker = self.workers.get(name)
        if worker is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no model {name!r} (served: {self.served()})")
        if worker.failed is not None and not worker.retry():
            raise Fault(worker.failed_code, worker.failed)
        if self.calls.draining:
            raise Fault(abi.ErrorCode.EAGAIN, "the kernel is shutting down")
        principal = call.caller.principal
        limit = worker.max_prompt_bytes
        size = prompt_bytes(args, limit)
        if size > limit:
            if worker.config.max_prompt_bytes:
                why = "its max_prompt_bytes"
            elif worker.context:
                why = (f"{PROMPT_BYTES_PER_TOKEN} bytes per token of its {worker.context}-token "
                       "context")
            else:
                why = (f"{PROMPT_BYTES_PER_TOKEN} bytes per token of an assumed "
                       f"{DEFAULT_CONTEXT_TOKENS}-token context; set max_prompt_bytes")
            raise Fault(abi.ErrorCode.EINVAL, f"prompt too long for model {name!r}: over "
                              f"{limit} bytes of text ({why})")
        key = (name, principal)
        cap = worker.config.agent_max_concurrent
        if cap and self.in_flight[key] >= cap:
            raise Fault(abi.ErrorCode.EAGAIN, f"{principal} has {cap} llm.chat calls in "
                              f"flight on {name!r} (agent_max_concurrent); retry when one ends")
        self.in_flight[key] += 1
        call.on_reply.append(lambda _: self._release(key))
        call.on_cancel.append(lambda: self._release(key))
        gen = Generation(id=next(self._ids), agent=principal, args=args,
                         arrival=time.monotonic(), prompt_bytes=size)
        calls = self.calls
        post = calls.post
        if args.stream:
            gen.on_delta = lambda text: post(lambda: calls.send_chunk(call, abi.ChatDelta(text)))
        gen.on_done = lambda result: post(lambda: calls.reply(call, result))
        gen.on_error = lambda code, message: post(lambda: calls.fail(call, code, message))
        call.on_cancel.append(lambda: worker.cancel(gen))
        self.calls.offload(call)
        worker.submit(gen)
        self.calls.counts[f"llm.model.{name}"] += 1
        if args.model in self.routed:
            self.routed[args.model][name] += 1
        return self.calls.park(call, call.timeout_ms)

    def _release(self, key: tuple[str, str]) -> None:
        self.in_flight[key] -= 1
        if not self.in_flight[key]:
            del self.in_flight[key]

    def pause(self, principal: str, paused: bool) -> None:
        """Suspend (or resume) an agent's LLM requests on every model."""
        for worker in self.workers.values():
            worker.pause(principal, paused)

    def agent_ended(self, principal: str) -> None:
        """The agent is over for good (not restarting): every model's scheduler forgets it, so
        per-agent accounting stays bounded by the agents alive. A restart keeps it: its token
        budget and attained service span the agent's life, or a crash would refill them."""
        for worker in self.workers.values():
            worker.forget_agent(principal)

    def cancel(self, call: Call, args: abi.CancelArgs) -> None:
        target = self.calls.find_parked(call.route, args.request)
        if target is None or target.name != "llm.chat":
            raise Fault(abi.ErrorCode.ENOENT, f"no llm.chat call {args.request} in flight "
                              "on this connection")
        self.calls.fail(target, abi.ErrorCode.ECANCELED, "cancelled by the caller")
