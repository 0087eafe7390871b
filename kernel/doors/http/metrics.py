"""`GET /metrics`: a `sys.stats` snapshot in Prometheus's text format (prometheus-client), with
the HTTP front end's own connection figures (kernel/doors/http/limits.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sdk import abi


class _Snapshot:
    """A one-shot collector over one `Stats`: every scrape reads the kernel afresh."""

    def __init__(self, stats: abi.Stats, http: dict[str, Any]) -> None:
        self.stats = stats
        self.http = http

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily("agentos_uptime_seconds", "Seconds since the kernel booted",
                                value=s.uptime_s)
        yield GaugeMetricFamily("agentos_agents_running", "Agents running", value=s.agents_running)
        yield GaugeMetricFamily("agentos_calls_parked", "Syscalls waiting for an event",
                                value=s.calls_parked)
        calls = CounterMetricFamily("agentos_syscalls", "Syscalls received", labels=["call"])
        for name, n in sorted(s.syscalls.items()):
            if not name.startswith("llm.model."):
                calls.add_metric([name], n)
        yield calls
        errors = CounterMetricFamily("agentos_syscall_errors", "Syscalls answered with an error",
                                     labels=["code"])
        for code, n in sorted(s.errors.items()):
            errors.add_metric([code], n)
        yield errors
        denials = CounterMetricFamily("agentos_denials", "Syscalls refused by the access check "
                                      "(EPERM)", labels=["family"])
        for family, n in sorted(s.denials.items()):
            denials.add_metric([family], n)
        yield denials
        latency = HistogramMetricFamily("agentos_syscall_duration_seconds",
                                        "Syscall latency, receipt to reply", labels=["family"])
        for family, hist in sorted(s.latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*abi.LATENCY_BUCKETS, float("inf")), hist.buckets, strict=True):
                cumulative += n
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", cumulative))
            latency.add_metric([family], buckets, hist.sum_s)
        yield latency
        yield from self._llm()
        yield from self._dependencies()
        yield from self._http()

    def _dependencies(self) -> Iterator[Metric]:
        """MCP servers, the embedder and models: up or not, their state, their restarts."""
        labels = ["kind", "name"]
        up = GaugeMetricFamily("agentos_dependency_up", "1 if the dependency serves now (MCP "
                               "server, embedder, model), else 0", labels=labels)
        state = GaugeMetricFamily("agentos_dependency_state", "1 for the dependency's current "
                                  "state", labels=[*labels, "state"])
        restarts = CounterMetricFamily(
            "agentos_dependency_restarts", "Restarts (MCP, embedder), loads tried again "
            "(local model) or outages (remote model server)", labels=labels)
        for d in self.stats.dependencies:
            up.add_metric([d.kind, d.name], 1.0 if d.state == "ready" else 0.0)
            state.add_metric([d.kind, d.name, d.state], 1.0)
            restarts.add_metric([d.kind, d.name], d.restarts)
        yield from (up, state, restarts)

    def _http(self) -> Iterator[Metric]:
        h = self.http
        yield GaugeMetricFamily("agentos_http_connections_open", "HTTP connections open now",
                                value=h["open"])
        yield GaugeMetricFamily("agentos_http_peers", "Peers with HTTP connections open",
                                value=h["peers"])
        yield CounterMetricFamily("agentos_http_connections", "HTTP connections accepted",
                                  value=h["accepted"])
        refused = CounterMetricFamily(
            "agentos_http_refused", "HTTP connections or requests refused or closed by a limit: "
            "connections, peer_connections (503); header_timeout, body_timeout (408); "
            "header_bytes (431); body_bytes (413)", labels=["limit"])
        for limit, n in h["refused"].items():
            refused.add_metric([limit], n)
        yield refused

    def _llm(self) -> Iterator[Metric]:
        s = self.stats
        rate = GaugeMetricFamily("agentos_llm_tokens_per_second",
                                 "Completion tokens per second over the last 10 s",
                                 labels=["model"])
        tokens = CounterMetricFamily("agentos_llm_tokens", "Tokens processed",
                                     labels=["model", "kind"])
        requests = CounterMetricFamily("agentos_llm_requests", "llm.chat calls completed",
                                       labels=["model"])
        for model, u in sorted(s.llm_usage.items()):
            rate.add_metric([model], u.get("tokens_per_s", 0.0))
            for kind in ("prompt", "completion", "cached"):
                tokens.add_metric([model, kind], u.get(f"{kind}_tokens", 0))
            requests.add_metric([model], u.get("calls", 0))
        yield from (rate, tokens, requests)
        queue = GaugeMetricFamily("agentos_llm_queue", "Generations by state", labels=[
            "model", "state"])
        preempt = CounterMetricFamily("agentos_llm_preemptions", "Generations switched out",
                                      labels=["model", "reason"])
        kv = GaugeMetricFamily("agentos_llm_kv_bytes", "KV cache bytes held", labels=["model"])
        replicas = GaugeMetricFamily(
            "agentos_llm_replica", "A fleet model's replicas (kernel/llm/fleet.py): healthy, "
            "outstanding, max_concurrency, served, failures, outages",
            labels=["model", "replica", "figure"])
        routed = CounterMetricFamily("agentos_llm_routed", "llm.chat calls a route (config "
                                     "[routes]) sent to each model", labels=["route", "model"])
        for model, m in sorted(s.models.items()):
            for key, value in m.items():
                if key.startswith("replica."):  # replica.N.FIGURE
                    _, index, figure = key.split(".", 2)
                    replicas.add_metric([model, index, figure], value)
                elif key.startswith("route."):  # route.MODEL, in a route's row
                    routed.add_metric([model, key.removeprefix("route.")], value)
            for state, key in (("waiting", "queued"), ("waiting", "waiting"),
                               ("running", "running"), ("running", "in_flight"),
                               ("preempted", "preempted")):
                if key in m:
                    queue.add_metric([model, state], m[key])
            if "preemptions" in m:
                preempt.add_metric([model, "schedule"], m["preemptions"])
            if "memory_preemptions" in m:
                preempt.add_metric([model, "memory"], m["memory_preemptions"])
            if "kv_bytes" in m:
                kv.add_metric([model], m["kv_bytes"])
        yield from (queue, preempt, kv, replicas, routed)
        # The memory manager's RAM tier (gauges) and its counters since boot.
        memory = GaugeMetricFamily("agentos_memory", "Memory manager: resident memories, RAM "
                                   "bytes, indexed namespaces, embedded/evicted/reloaded so far",
                                   labels=["figure"])
        for figure, value in sorted(s.memory.items()):
            memory.add_metric([figure], value)
        yield memory


def render(stats: abi.Stats, http: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, http))
    return generate_latest(registry)
