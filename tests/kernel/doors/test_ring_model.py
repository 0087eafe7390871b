"""Both rings against a deque model, under random interleavings, near-full, near-empty and wrap."""

from __future__ import annotations

import struct
from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kernel.doors.ring import CompletionProducer, SubmissionConsumer
from sdk.ring import (
    COUNTER_MASK,
    HEAD_OFFSET,
    TAIL_OFFSET,
    CompletionConsumer,
    Geometry,
    SubmissionProducer,
    format_ring,
)
from tests.conftest import DEEP

# Counters that wrap within a run, and anywhere else.
starts = st.one_of(st.sampled_from([0, 2**32 - 1, 2**32 - 2, 2**32 - 7, 2**31 - 3]),
                   st.integers(0, COUNTER_MASK))
payloads = st.binary(max_size=60)  # some overflow the smaller slots

U32 = struct.Struct("I")  # the test's own hands on a segment, single-threaded


def _fitting(model: deque[bytes], batch: list[bytes], geometry: Geometry) -> int:
    """How many of `batch` a correct producer publishes: in order, up to the first that does
    not fit a slot or finds the ring full."""
    n = 0
    for payload in batch:
        if len(payload) > geometry.payload_capacity or len(model) + n >= geometry.capacity:
            break
        n += 1
    return n


class RingModels(RuleBasedStateMachine):
    """The submission ring (agent producer, kernel consumer) and the completion ring (kernel
    producer, agent consumer), each checked entry for entry against a deque."""

    @initialize(capacity=st.sampled_from([1, 2, 4, 8]), slot_size=st.sampled_from([16, 24, 64]),
                sq_start=starts, cq_start=starts, zeroed=st.booleans())
    def setup(self, capacity: int, slot_size: int, sq_start: int, cq_start: int,
              zeroed: bool) -> None:
        self.geometry = Geometry(capacity, slot_size)
        self.sq_buf = bytearray(self.geometry.size)
        self.cq_buf = bytearray(self.geometry.size)
        format_ring(self.sq_buf, self.geometry, sq_start, zeroed=zeroed)
        format_ring(self.cq_buf, self.geometry, cq_start, zeroed=zeroed)
        self.sq_producer = SubmissionProducer(self.sq_buf, capacity, slot_size)
        self.sq_consumer = SubmissionConsumer(self.sq_buf, capacity, slot_size, start=sq_start)
        self.cq_producer = CompletionProducer(self.cq_buf, capacity, slot_size, start=cq_start)
        self.cq_consumer = CompletionConsumer(self.cq_buf, capacity, slot_size)
        self.sq_model: deque[bytes] = deque()
        self.cq_model: deque[bytes] = deque()

    # --- submission ring ---------------------------------------------------------------------

    @rule(payload=payloads)
    def sq_push(self, payload: bytes) -> None:
        fits = _fitting(self.sq_model, [payload], self.geometry) == 1
        assert self.sq_producer.push(payload) is fits
        if fits:
            self.sq_model.append(payload)

    @rule(batch=st.lists(payloads, max_size=10))
    def sq_push_many(self, batch: list[bytes]) -> None:
        expected = _fitting(self.sq_model, batch, self.geometry)
        assert self.sq_producer.push_many(batch) == expected
        self.sq_model.extend(batch[:expected])

    @rule(max_n=st.integers(0, 10))
    def sq_drain(self, max_n: int) -> None:
        got, faults = self.sq_consumer.drain(max_n)
        assert faults == []
        assert got == [self.sq_model.popleft() for _ in range(min(max_n, len(self.sq_model)))]

    # --- completion ring ---------------------------------------------------------------------

    @rule(payload=payloads)
    def cq_push(self, payload: bytes) -> None:
        fits = _fitting(self.cq_model, [payload], self.geometry) == 1
        assert self.cq_producer.push(payload) is fits
        if fits:
            self.cq_model.append(payload)

    @rule(batch=st.lists(payloads, max_size=10))
    def cq_push_many(self, batch: list[bytes]) -> None:
        expected = _fitting(self.cq_model, batch, self.geometry)
        assert self.cq_producer.push_many(batch) == expected
        self.cq_model.extend(batch[:expected])

    @rule()
    def cq_pop(self) -> None:
        got = self.cq_consumer.pop()
        assert got == (self.cq_model.popleft() if self.cq_model else None)

    @rule(max_n=st.integers(0, 10))
    def cq_pop_many(self, max_n: int) -> None:
        got = self.cq_consumer.pop_many(max_n)
        assert got == [self.cq_model.popleft() for _ in range(min(max_n, len(self.cq_model)))]

    # --- both --------------------------------------------------------------------------------

    @invariant()
    def counters_match_the_model(self) -> None:
        for buf, model in ((self.sq_buf, self.sq_model), (self.cq_buf, self.cq_model)):
            tail = U32.unpack_from(buf, TAIL_OFFSET)[0]
            head = U32.unpack_from(buf, HEAD_OFFSET)[0]
            assert (tail - head) & COUNTER_MASK == len(model)
        assert self.sq_producer.free() == self.geometry.capacity - len(self.sq_model)
        assert not self.sq_consumer.quarantined and not self.cq_producer.quarantined


RingModels.TestCase.settings = settings(max_examples=80 * DEEP, stateful_step_count=60,
                                        deadline=None)
TestRingModels = RingModels.TestCase
