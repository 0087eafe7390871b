"""Where a remote model's calls run: a fleet of OpenAI-compatible replicas and the router that
picks one replica per call.

The model's scheduler decides *which* call runs next; the router decides *where*. Affinity
first: an agent's call goes to the replica that took its previous one (that replica holds its
prefix in its cache; Autellix and Ray Serve LLM route the same way), while it is healthy and has
room. Otherwise the healthy replica with the least outstanding work, as a share of its
concurrency limit. A replica that fails (a call broken in flight, or a failed periodic
`GET /models`) is drained: it takes no new call until a probe, backed off from PROBE_FIRST_S
to PROBE_MAX_S, finds it answering again.

Counts (outstanding, served, affinity) change only on the model's worker thread; health is set
by the worker (failures in flight) and by each replica's health thread, under a lock.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable

from kernel.llm.remote import RemoteModel

log = logging.getLogger("kernel.llm")

# A drained replica is probed this long after it failed, then twice as long each time it still
# does not answer, up to the cap.
PROBE_FIRST_S = 0.5
PROBE_MAX_S = 30.0
PROBE_TIMEOUT_S = 5.0  # the longest a health check waits for its answer
MAX_AFFINITY = 65536  # agents remembered (least recently routed forgotten first)


class Replica:
    """One server of a fleet and what the router knows of it."""

    def __init__(self, index: int, remote: RemoteModel, max_concurrency: int) -> None:
        self.index = index
        self.remote = remote
        self.url = remote.base_url
        self.max_concurrency = max_concurrency
        self.outstanding = 0  # calls streaming on it now
        self.served = 0  # calls it finished
        self.failures = 0  # calls that broke on it (connection, timeout, 5xx, a cut stream)
        self.outages = 0  # times it was drained
        self.error: str | None = None  # why it is drained; None: healthy
        self.kick = threading.Event()  # wakes its health thread early (it just failed; close)

    @property
    def healthy(self) -> bool:
        return self.error is None

    def load(self) -> float:
        return self.outstanding / self.max_concurrency

    def figures(self) -> dict[str, float]:
        return {"healthy": float(self.healthy), "outstanding": self.outstanding,
                "max_concurrency": self.max_concurrency, "served": self.served,
                "failures": self.failures, "outages": self.outages}


class Router:
    """Picks a replica per call, counts their work, drains the failing and probes them back."""

    def __init__(self, name: str, replicas: list[Replica], wake: Callable[[], None],
                 health_interval_s: float = 10.0, affinity: bool = True) -> None:
        self.name = name
        self.affinity = affinity  # False: least loaded only (the config's `affinity = false`)
        self.replicas = replicas
        self.health_interval_s = health_interval_s  # 0: checked only after a failure
        self._wake = wake
        self._affinity: collections.OrderedDict[str, Replica] = collections.OrderedDict()
        self._health = threading.Lock()
        self._closed = threading.Event()
        self._watchers = [threading.Thread(target=self._watch, args=(r,), daemon=True,
                                           name=f"health-{name}-{r.index}") for r in replicas]
        for thread in self._watchers:
            thread.start()

    # --- routing (the worker thread) ------------------------------------------------------------

    def pick(self, agent: str, avoid: Iterable[Replica] = ()) -> Replica | None:
        """The replica for the agent's next call, or None if no healthy one has room."""
        avoid = set(avoid)
        held = self._affinity.get(agent) if self.affinity else None
        if (held is not None and held.healthy and held.outstanding < held.max_concurrency
                and held not in avoid):
            return held
        open_ = [r for r in self.replicas if r.healthy and r not in avoid
                 and r.outstanding < r.max_concurrency]
        return min(open_, key=lambda r: (r.load(), r.outstanding, r.index), default=None)

    def usable(self, avoid: Iterable[Replica] = ()) -> bool:
        """Whether a healthy replica outside `avoid` exists (room or not: room comes back)."""
        avoid = set(avoid)
        return any(r.healthy and r not in avoid for r in self.replicas)

    def begin(self, replica: Replica, agent: str) -> None:
        replica.outstanding += 1
        self._affinity[agent] = replica
        self._affinity.move_to_end(agent)
        while len(self._affinity) > MAX_AFFINITY:
            self._affinity.popitem(last=False)

    def end(self, replica: Replica, served: bool) -> None:
        replica.outstanding -= 1
        replica.served += served

    def capacity(self) -> int:
        """Calls the fleet can stream at once: what the scheduler may have running. A drained
        replica's calls still in flight count until they end."""
        return sum(r.max_concurrency if r.healthy else r.outstanding for r in self.replicas)

    def forget_agent(self, agent: str) -> None:
        self._affinity.pop(agent, None)

    # --- health -----------------------------------------------------------------------------

    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def error(self) -> str | None:
        """Why the model cannot take calls (every replica drained); None if one is healthy."""
        if self.healthy():
            return None
        return "; ".join(f"{r.url}: {r.error}" if len(self.replicas) > 1 else str(r.error)
                         for r in self.replicas)

    def outages(self) -> int:
        return sum(r.outages for r in self.replicas)

    def failed(self, replica: Replica, why: str) -> None:
        """A call broke on the replica (it is down, silent or broken): drain it and probe it."""
        replica.failures += 1
        self._drain(replica, why)

    def _drain(self, replica: Replica, why: str) -> None:
        with self._health:
            if replica.error is not None or self._closed.is_set():
                return
            replica.error, replica.outages = why, replica.outages + 1
        log.warning("remote replica unhealthy", extra={"model": self.name, "replica": replica.url,
                                                        "reason": why})
        replica.kick.set()
        self._wake()

    def _watch(self, replica: Replica) -> None:
        """The replica's health thread: a periodic `GET /models` while it is healthy; after it
        failed, probes backed off until one answers."""
        wait = PROBE_FIRST_S
        while not self._closed.is_set():
            if replica.healthy:
                wait = PROBE_FIRST_S
                period = self.health_interval_s or None
            else:
                period = wait
            if replica.kick.wait(period):  # drained meanwhile (probe it soon), or closing
                replica.kick.clear()
                continue
            answered = replica.remote.probe(timeout=min(replica.remote.timeout, PROBE_TIMEOUT_S))
            if self._closed.is_set():
                return
            if answered and not replica.healthy:
                with self._health:
                    replica.error = None
                log.info("remote replica healthy again", extra={"model": self.name,
                                                                "replica": replica.url})
                self._wake()
            elif not answered and replica.healthy:
                self._drain(replica, f"health check failed: GET {replica.url}/models")
            elif not answered:
                wait = min(wait * 2, PROBE_MAX_S)

    def figures(self) -> dict[str, float]:
        """Per-replica figures for sys.stats: `replica.N.FIGURE` (N: its place in the config)."""
        return {f"replica.{r.index}.{k}": v for r in self.replicas for k, v in r.figures().items()}

    def close(self) -> None:
        self._closed.set()
        for replica in self.replicas:
            replica.kick.set()
            replica.remote.close()
