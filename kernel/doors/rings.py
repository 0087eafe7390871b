"""Per-agent syscall rings in the kernel's loop: made at spawn, drained on doorbells, answered
through the completion ring, quarantined when hostile, closed when their agent is reaped.

A ring is a second door into the same dispatch path as the ROUTER (`Kernel.execute`): the same
decoding, access check, savepoint and group commit, and replies leave only after the batch's
commit. The principal of an entry is the agent whose ring it came from; only that agent (and
the children it shares its fds with) holds the ring's fds, so the ring itself is the attested
identity, as the peer credentials are on ipc://.

Replies to ring calls carry a `RingRoute`, a bytes subclass that no ZeroMQ routing id can be,
so no peer on the ROUTER can make the kernel write into someone's completion ring. A reply
larger than a slot is cut into fragments (see `sdk.ringpath`); replies that do not fit the
completion ring yet wait in a bounded per-ring backlog, retried every millisecond, since a
ring call has no ZeroMQ route to fall back to.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from kernel.doors import Door
from kernel.doors.ring import RingError, RingFault, RingPair, fence
from sdk import abi, layout
from sdk.ringpath import encode_spec, fragments

if TYPE_CHECKING:
    from kernel.core import Kernel
    from kernel.poller import Poller
    from kernel.proc.spawner import Extras

log = logging.getLogger("kernel.doors.rings")

# Completions held back per ring while its agent is not consuming; beyond it they are dropped,
# as the ROUTER drops replies to a peer past its high-water mark.
BACKLOG_BYTES = 16 << 20
# How soon the loop retries pushing a backlog into a full completion ring.
BACKLOG_RETRY_S = 0.001
POLL_DOORS_S = 50e-6  # while spinning on rings, how often the other doors are looked at


class RingRoute(bytes):
    """The reply route of calls that came through a ring (never a ZeroMQ routing id)."""


@dataclass(eq=False)
class AgentRing:
    principal: str  # whose entries these are: "agent:<id>", or "user:<uid>" (ringdoor.py)
    agent_id: int | None
    pair: RingPair
    route: RingRoute
    doorbell: int
    backlog: collections.deque[bytes] = field(default_factory=collections.deque)
    backlog_bytes: int = 0
    closed: bool = False  # quarantined: no more entries are read
    advice: int = -1  # the spin advice last written into its completion ring
    limit: int = 0  # payload bytes per slot
    # Its own ring.entries / ring.doorbells / ring.polled, for its owner's `sys.stats`.
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.limit = self.pair.geometry.payload_capacity


class Rings(Door):
    """Every live agent's rings, keyed by agent, doorbell fd and reply route: a door
    (kernel/doors/__init__.py) whose routes are `RingRoute`s."""

    routes = RingRoute

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self._by_agent: dict[int, AgentRing] = {}
        self._by_fd: dict[int, AgentRing] = {}
        self._by_route: dict[bytes, AgentRing] = {}
        self._again: set[AgentRing] = set()  # stopped at the per-round bound: drain next round
        self._backlogged: set[AgentRing] = set()
        self._touched: set[AgentRing] = set()  # got completions in this flush
        # Polling (SQPOLL): rings with traffic in the current window, flagged POLLING so their
        # agents do not ring; the loop looks at their tails until `poll_until`.
        self._polled: set[AgentRing] = set()
        self.poll_until = 0.0
        self._window = kernel.config.ring_poll_us / 8e6  # adapted in `_poll`
        self._slept = False  # polling stopped since the window last adapted
        self._last_traffic = 0.0  # when a polled ring last had entries
        self._cpus = len(os.sched_getaffinity(0))

    # --- lifecycle ---------------------------------------------------------------------------

    def create(self, agent_id: int) -> tuple[tuple[int, ...], str] | None:
        """Make an agent's rings before it is spawned: the fds to pass and its spec for the
        environment, or None when rings are off or cannot be made (it then uses ZeroMQ)."""
        if not self.k.config.rings:
            return None
        self.drop(agent_id)  # a leftover of a spawn that failed before its agent existed
        ring = self.make(f"agent:{agent_id}", agent_id)
        if ring is None:
            return None
        self._by_agent[agent_id] = ring
        return ring.pair.fds(), encode_spec(ring.pair.spec())

    def make(self, principal: str, agent_id: int | None = None) -> AgentRing | None:
        """A new pair of rings whose entries are `principal`'s, drained from now on; None
        when they cannot be made. `close` undoes it."""
        config = self.k.config
        try:
            pair = RingPair.create(config.ring_capacity, config.ring_slot_size,
                                   max_faults=config.ring_max_faults)
        except RingError as exc:
            log.warning("no rings", extra={"principal": principal, "error": str(exc)})
            return None
        ring = AgentRing(principal, agent_id, pair, RingRoute(secrets.token_bytes(16)),
                         pair.submission_doorbell)
        self._by_fd[ring.doorbell] = ring
        self._by_route[ring.route] = ring
        self.k.poller.register(ring.doorbell, zmq.POLLIN)
        return ring

    def close_ring(self, ring: AgentRing) -> None:
        """Stop draining `ring`, unmap it and close its fds; replies still due are dropped."""
        if ring.agent_id is not None and self._by_agent.get(ring.agent_id) is ring:
            del self._by_agent[ring.agent_id]
        self._forget(ring)
        ring.pair.close()

    def on_spawn(self, agent_id: int, extras: Extras) -> None:
        """The process table's spawn hook: the agent inherits its rings' fds and spec."""
        made = self.create(agent_id)
        if made is not None:
            fds, spec = made
            extras.fds.extend(fds)
            extras.env[layout.ENV_RINGS] = spec

    def on_started(self, agent_id: int) -> None:
        """The process table's start hook: the agent inherited its segments; the kernel keeps
        only its mappings and doorbells."""
        ring = self._by_agent.get(agent_id)
        if ring is not None:
            ring.pair.handed_over()

    def counts_of(self, agent_id: int | None) -> dict[str, int]:
        """An agent's own ring figures (none for a caller without rings of its own)."""
        ring = self._by_agent.get(agent_id) if agent_id is not None else None
        return dict(ring.counts) if ring is not None else {}

    def drop(self, agent_id: int) -> None:
        """The agent is gone (reaped, or never started): unmap and close its rings."""
        ring = self._by_agent.get(agent_id)
        if ring is not None:
            self.close_ring(ring)

    def _forget(self, ring: AgentRing) -> None:
        if self._by_fd.pop(ring.doorbell, None) is not None:
            self.k.poller.unregister(ring.doorbell)
        self._by_route.pop(ring.route, None)
        self._again.discard(ring)
        self._backlogged.discard(ring)
        self._touched.discard(ring)
        self._polled.discard(ring)

    def close(self) -> None:
        for ring in list(self._by_route.values()):
            self.close_ring(ring)

    # --- submissions -------------------------------------------------------------------------

    def on_ready(self, ready: Mapping[Any, int]) -> None:
        """Drain the rings whose doorbells rang, and those left with entries last round."""
        todo = [self._by_fd[fd] for fd in ready if isinstance(fd, int) and fd in self._by_fd]
        for ring in todo:
            ring.pair.acknowledge()
        if todo:
            self.k.calls.counts["ring.doorbells"] += len(todo)
            for ring in todo:
                ring.counts["ring.doorbells"] += 1
        again, self._again = self._again, set()
        todo.extend(r for r in again if r not in todo)
        if self._polled:
            found = [r for r in self._polled if r not in todo and r.pair.submissions.pending()]
            if found:
                self.k.calls.counts["ring.polled"] += len(found)
                for ring in found:
                    ring.counts["ring.polled"] += 1
                todo.extend(found)
        for ring in todo:
            try:
                self._drain(ring)
            except Exception:  # a kernel bug one ring's entries trip stays that ring's
                self._failed(ring, "drain")

    # --- polling without doorbells -------------------------------------------------------------

    def wait(self, poller: Poller, timeout_ms: int | None) -> dict[Any, int]:
        """The loop's wait: what `poller` finds ready within `timeout_ms`. While rings are
        being polled it spins on their tails instead (yielding the CPU each turn), looking at
        the other doors every `POLL_DOORS_S`; when the polling window ends it clears the
        rings' flags and sleeps in the poll."""
        if not self._polled or timeout_ms == 0:
            return dict(poller.poll(timeout_ms))
        if self.k.calls.offloaded:  # no spinning now (see `offload`): wait as without polling
            return {} if self.stop_polling() else dict(poller.poll(timeout_ms))
        now = time.monotonic()
        end = now + (timeout_ms / 1000 if timeout_ms is not None else 3600.0)
        spin_end = min(end, self.poll_until)
        doors_at = now
        while now < spin_end:
            if self.pending():
                return {}
            if now >= doors_at:
                ready = dict(poller.poll(0))
                if ready:
                    return ready
                doors_at = now + POLL_DOORS_S
            os.sched_yield()  # on an oversubscribed CPU, let the agents run
            now = time.monotonic()
        if spin_end == end:
            return {}  # the caller's timeout (a timer is due); still polling
        if self.stop_polling():
            return {}  # entries arrived as the window closed
        left = None if timeout_ms is None else max(0, int((end - time.monotonic()) * 1000))
        return dict(poller.poll(left))

    @property
    def polling(self) -> bool:
        return bool(self._polled)

    def pending(self) -> bool:
        """Whether a polled ring has new entries (a few loads; the loop's spin test)."""
        return any(r.pair.submissions.pending() for r in self._polled)

    def _poll(self, ring: AgentRing) -> None:
        limit = self.k.config.ring_poll_us / 1e6
        if limit <= 0 or self.k.calls.offloaded:
            return
        now = time.monotonic()
        if ring not in self._polled:
            if not self._polled and self._slept:
                # Adapt the window, as NAPI adapts its busy-poll budget: traffic that came
                # back within `limit` of the last would have been caught by a window that
                # long (grow to cover it, with a margin); a longer quiet says the window only
                # burns CPU (halve it).
                quiet = now - self._last_traffic
                window = max(self._window, 1.5 * quiet) if quiet < limit else self._window / 2
                self._window = min(limit, max(limit / 16, window))
                self._slept = False
            self._polled.add(ring)
            ring.pair.submissions.set_polling(True)
        self._last_traffic = now
        self.poll_until = now + min(limit, self._window)

    def stop_polling(self) -> bool:
        """Leave polling: flags cleared, then one more look (after a fence, so an agent that
        saw the flag still set has its entries found here). True if some were found; they are
        drained next round."""
        self._slept = True
        polled, self._polled = self._polled, set()
        for ring in polled:
            ring.pair.submissions.set_polling(False)
        fence()
        found = [r for r in polled if r.pair.submissions.pending()]
        self._again.update(found)
        return bool(found)

    def _drain(self, ring: AgentRing) -> None:
        if ring.closed:
            return
        bound = self.k.config.ring_batch
        try:
            payloads, faults = ring.pair.drain(bound)
        except RingError:
            return  # closed under us; cannot happen on the loop thread, but never crash
        for fault in faults:
            self._on_fault(ring, fault)
        if payloads:
            self.k.calls.counts["ring.entries"] += len(payloads)
            ring.counts["ring.entries"] += len(payloads)
            self._poll(ring)
        for payload in payloads:
            try:
                ok = self.k.submit(ring.route, ring.principal, payload)
            except Exception:  # the last line of defence, as for the ROUTER
                log.exception("ring dispatch failed", extra={"principal": ring.principal})
                continue
            if not ok:
                self._on_fault(ring, ring.pair.submissions.charge("undecodable request"),
                               answered=True)
        if ring.pair.quarantined:
            self._quarantine(ring)
        elif len(payloads) + len(faults) >= bound:
            self._again.add(ring)

    def _on_fault(self, ring: AgentRing, fault: RingFault, answered: bool = False) -> None:
        log.warning("ring fault", extra={"principal": ring.principal, "kind": fault.kind.value,
                                         "detail": fault.detail})
        self.k.calls.errors["ring." + fault.kind.value] += 1
        if fault.data and not answered:
            # The entry is lost, but its request id may still be readable: answer it, so the
            # caller learns at once rather than at its deadline.
            self.k.calls.send_error(ring.route, abi.request_id_of(fault.data), abi.ErrorCode.EINVAL,
                               f"malformed ring entry: {fault.detail}")

    def _quarantine(self, ring: AgentRing) -> None:
        if ring.closed:
            return
        ring.closed = True
        self._polled.discard(ring)
        if self._by_fd.pop(ring.doorbell, None) is not None:
            self.k.poller.unregister(ring.doorbell)  # a doorbell flood now costs nothing
        self._again.discard(ring)
        last = ring.pair.submissions.last_fault or ring.pair.completions.last_fault
        log.error("ring quarantined", extra={"principal": ring.principal,
                                             "last": last.detail if last else ""})
        self.k.calls.counts["ring.quarantined"] += 1
        self.k.audit.append("kernel", "ring-quarantine", subject=ring.principal,
                            fault=last.kind.value if last else "")

    def quarantined(self, agent_id: int) -> bool:
        ring = self._by_agent.get(agent_id)
        return ring is not None and ring.closed

    # --- completions -------------------------------------------------------------------------

    def deliver(self, route: bytes, frame: bytes) -> None:
        """Queue a reply for the ring of `route`."""
        ring = self._by_route.get(route)
        if ring is None:
            return  # its agent is gone; so is the reply
        size = len(frame)
        if ring.backlog_bytes + size > BACKLOG_BYTES:
            self.k.calls.errors["ring.backlog_dropped"] += 1
            return
        if size <= ring.limit:
            ring.backlog.append(frame)
        else:
            pieces = fragments(frame, ring.limit)
            size = sum(map(len, pieces))
            ring.backlog.extend(pieces)
        ring.backlog_bytes += size
        self._touched.add(ring)

    def flush(self) -> None:
        """Publish queued completions, one tail store and one doorbell per ring."""
        rings = self._touched | self._backlogged
        self._touched = set()
        # Spinning agents help only while each has a CPU of its own beside the kernel's; past
        # that they take the CPU from the kernel they are waiting for (or, while another
        # thread works on a call, from that work: a model generating, a search).
        advice = self.k.config.ring_spin_us if (
            len(self._polled) < self._cpus and not self.k.calls.offloaded) else 0
        for ring in rings:
            try:
                self._complete(ring, advice)
            except Exception:
                self._failed(ring, "complete")

    def _complete(self, ring: AgentRing, advice: int) -> None:
        if ring.advice != advice:
            ring.advice = advice
            ring.pair.completions.advise(advice)
        backlog = ring.backlog
        n = ring.pair.complete(backlog) if not ring.pair.completions.quarantined else 0
        for _ in range(n):
            ring.backlog_bytes -= len(backlog.popleft())
        if ring.pair.completions.quarantined:
            backlog.clear()
            ring.backlog_bytes = 0
            self._quarantine(ring)
        if backlog:
            self._backlogged.add(ring)
        else:
            self._backlogged.discard(ring)

    def _failed(self, ring: AgentRing, stage: str) -> None:
        """The last line of defence, as for the ROUTER: log the bug and close the ring (its
        owner's later calls over it time out; the kernel and every other ring go on)."""
        log.exception("ring %s failed; closing the ring", stage,
                      extra={"principal": ring.principal})
        self.k.calls.errors["ring.internal"] += 1
        try:
            self.close_ring(ring)
        except Exception:
            log.exception("closing a failed ring failed")

    def wait_hint(self) -> float | None:
        """How long the loop may sleep as far as the rings are concerned (None: any time)."""
        if self._again:
            return 0.0
        if self._backlogged:
            return BACKLOG_RETRY_S
        return None
