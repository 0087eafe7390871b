"""One LLM step: a backend's step returns events (kernel/llm/events.py), the worker applies them,
memory pressure is a scheduling decision (kernel/llm/sched/pressure.py), and an ended agent's
scheduler state is forgotten. The local backend runs the tiny random model, the remote one a
real HTTP server on a thread."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from kernel.config import ModelConfig
from kernel.llm.backends import LocalBackend, RemoteBackend
from kernel.llm.chat import render
from kernel.llm.events import Delta, Event, Failed, Finished, Started
from kernel.llm.sched import FIFO, Job, MemoryPressure
from kernel.llm.worker import Generation, ModelWorker
from sdk import abi
from tests.conftest import wait_until


def _config(tiny_dir: Path, **options: object) -> ModelConfig:
    """float32, as the transformers reference its outputs are compared with."""
    return ModelConfig(name="tiny", source=str(tiny_dir), dtype="float32",
                       **options)  # type: ignore[arg-type]


def _gen(gen_id: int, text: str = "hello there", agent: str = "agent:1", tokenizer: object = None,
         **args: object) -> Generation:
    chat = abi.ChatArgs(messages=[abi.ChatMessage(role="user", content=text)],
                        **args)  # type: ignore[arg-type]
    gen = Generation(id=gen_id, agent=agent, args=chat, arrival=time.monotonic())
    if tokenizer is not None:
        gen.prompt_ids = render(tokenizer, chat)
    return gen


def _run(backend: LocalBackend, limit: int = 2000) -> list[Event]:
    """Step until the scheduler holds nothing; every event of every step."""
    events: list[Event] = []
    for _ in range(limit):
        if not (backend.sched.waiting() or backend.sched.running()):
            return events
        events += backend.step()
    raise AssertionError("the backend never drained")


def _texts(events: list[Event]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in events:
        if isinstance(e, Delta):
            texts[e.id] = texts.get(e.id, "") + e.text
    return texts


@pytest.fixture(scope="module")
def local(tiny_dir: Path) -> LocalBackend:
    return LocalBackend(_config(tiny_dir))


# --- the local backend's step --------------------------------------------------------------------

def test_a_step_reports_start_progress_and_finish_as_events(local: LocalBackend,
                                                             tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gen = _gen(1, tokenizer=local.tokenizer, max_tokens=8)
    local.admit(gen)
    first = local.step()
    assert isinstance(first[0], Started) and first[0].id == 1 and first[0].cached == 0
    assert isinstance(first[1], Delta) and first[1].tokens == 1  # a short prompt: one step
    events = first + _run(local)
    assert [type(e) for e in events].count(Started) == 1
    (end,) = [e for e in events if isinstance(e, Finished)]
    assert events[-1] is end and end.id == 1 and end.preemptions == 0
    assert end.text is None and end.usage is None  # the worker assembles them from the deltas
    generated = sum(e.tokens for e in events if isinstance(e, Delta))
    assert end.reason == ("length" if generated == 8 else "stop")

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([gen.prompt_ids]), max_new_tokens=8, do_sample=False)
    assert _texts(events)[1] == local.tokenizer.decode(out[0, len(gen.prompt_ids):],
                                                       skip_special_tokens=True)
    # The same prompt again: its KV comes from the prefix cache, and the Started event says so.
    local.admit(_gen(2, tokenizer=local.tokenizer, max_tokens=8))
    again = _run(local)
    assert again[0] == Started(2, again[0].at, len(gen.prompt_ids) - 1)
    assert _texts(again)[2] == _texts(events)[1]


def test_a_spent_token_budget_is_a_failure_event(local: LocalBackend, tiny_dir: Path) -> None:
    prompt = len(_gen(1, tokenizer=local.tokenizer).prompt_ids)
    backend = LocalBackend(_config(tiny_dir, agent_max_tokens=prompt + 3))
    gen = _gen(1, tokenizer=backend.tokenizer, max_tokens=16, ignore_eos=True)
    backend.admit(gen)
    events = _run(backend)
    assert sum(e.tokens for e in events if isinstance(e, Delta)) == 3  # then the budget is spent
    assert events[-1] == Failed(1, abi.ErrorCode.EQUOTA, "token budget of agent:1 is spent")
    assert not any(isinstance(e, Finished) for e in events)
    assert backend.engine.stats()["sequences"] == 0  # the engine let it go too


def test_memory_pressure_switches_out_by_recompute_and_keeps_outputs(tiny_dir: Path) -> None:
    """Under a tight KV limit the step preempts for memory (no snapshot kept) and each output is
    token for token the one an unconstrained run gives."""
    questions = [f"question {i} " + "padding " * 20 for i in range(3)]

    def run(backend: LocalBackend) -> tuple[dict[int, str], list[Finished]]:
        for i, q in enumerate(questions):
            backend.admit(_gen(i, q, agent=f"agent:{i}", tokenizer=backend.tokenizer,
                               max_tokens=20, ignore_eos=True))
        snapshots = 0
        events: list[Event] = []
        while backend.sched.waiting() or backend.sched.running():
            events += backend.step()
            snapshots = max(snapshots, backend.engine.stats()["kv_snapshot_bytes"])
        assert snapshots == 0  # a switch for memory never keeps a copy of the memory short
        return _texts(events), [e for e in events if isinstance(e, Finished)]

    tight = LocalBackend(_config(tiny_dir, kv_budget_mb=0.05, prefill_chunk=16))
    texts, ends = run(tight)
    assert tight.pressure.preemptions > 0 and tight.stats()["memory_preemptions"] > 0
    assert any(e.preemptions for e in ends) and len(ends) == 3
    assert 1 <= tight.stats()["batch_capacity"] <= 64
    free_texts, _ = run(LocalBackend(_config(tiny_dir, prefill_chunk=16)))
    assert texts == free_texts


# --- memory pressure, the scheduling decision ---------------------------------------------------

def _fifo(n: int, capacity: int) -> FIFO:
    sched = FIFO()
    for i in range(n):
        sched.submit(Job(i, f"agent:{i}", float(i), 10, 100), float(i))
    sched.schedule(10.0, capacity)
    return sched


def test_pressure_without_a_limit_never_measures() -> None:
    def held() -> int:
        raise AssertionError("measured without a limit")

    pressure = MemoryPressure(0, max_batch=3)
    plan = pressure.schedule(_fifo(4, 0), 11.0, held)
    assert [j.id for j in plan.run] == [0, 1, 2] and not plan.recompute and not plan.drop


def test_pressure_over_the_limit_switches_one_out_and_drops_snapshots() -> None:
    sched = _fifo(4, 3)  # 0, 1, 2 run; 3 waits
    pressure = MemoryPressure(1000, max_batch=3)
    plan = pressure.schedule(sched, 11.0, lambda: 1001)
    assert pressure.capacity == 2
    assert [j.id for j in plan.run] == [0, 1] and [j.id for j in plan.preempt] == [2]
    assert plan.recompute and [j.id for j in plan.drop] == [3]  # waiting before the switch
    assert pressure.preemptions == 1
    plan = pressure.schedule(sched, 12.0, lambda: 1500)  # still over: one fewer again
    assert pressure.capacity == 1 and [j.id for j in plan.preempt] == [1]
    assert {j.id for j in plan.drop} == {2, 3} and pressure.preemptions == 2
    plan = pressure.schedule(sched, 13.0, lambda: 5000)  # never below one place
    assert pressure.capacity == 1 and [j.id for j in plan.run] == [0] and not plan.preempt


def test_pressure_holds_between_the_marks_and_grows_back_below_the_low_one() -> None:
    sched = _fifo(4, 3)
    pressure = MemoryPressure(1000, max_batch=3)
    pressure.schedule(sched, 11.0, lambda: 2000)
    assert pressure.capacity == 2
    plan = pressure.schedule(sched, 12.0, lambda: 900)  # between 80% and the limit
    assert pressure.capacity == 2 and not plan.recompute and not plan.drop and not plan.preempt
    plan = pressure.schedule(sched, 13.0, lambda: 799)  # below 80%: one place more
    assert pressure.capacity == 3 and len(plan.run) == 3 and not plan.recompute
    pressure.schedule(sched, 14.0, lambda: 0)
    assert pressure.capacity == 3  # never above max_batch
    assert pressure.preemptions == 1


# --- the worker applies events -------------------------------------------------------------------

def test_the_worker_turns_events_into_replies(tiny_dir: Path) -> None:
    worker = ModelWorker(_config(tiny_dir), post=lambda fn: fn())  # not started: no thread
    done: list[abi.ChatResult] = []
    failed: list[tuple[abi.ErrorCode, str]] = []
    deltas: list[str] = []
    a, b = _gen(1), _gen(2)
    a.prompt_ids = [5, 6, 7]
    a.on_delta, a.on_done = deltas.append, done.append
    b.on_error = lambda code, message: failed.append((code, message))
    worker.gens = {1: a, 2: b}
    worker._apply([Started(1, a.arrival + 0.5, cached=2), Delta(1, "", 0), Delta(1, "hi", 1),
                   Delta(9, "lost", 1), Delta(1, " there", 1), Failed(2, abi.ErrorCode.EIO, "x")])
    assert deltas == ["hi", " there"] and failed == [(abi.ErrorCode.EIO, "x")]
    assert list(worker.gens) == [1] and not done
    worker._apply([Finished(1, "length", preemptions=2), Delta(1, "late", 1)])
    (result,) = done
    assert result.message.content == "hi there" and result.finish_reason == "length"
    assert result.usage == abi.Usage(3, 2, 2) and result.preemptions == 2
    assert result.queued_ms == pytest.approx(500, abs=1) and not worker.gens


def test_a_forgotten_agent_waits_for_its_calls_and_its_neighbour_is_kept(tiny_dir: Path) -> None:
    worker = ModelWorker(_config(tiny_dir), post=lambda fn: fn())
    results: dict[str, abi.ChatResult] = {}
    worker.start()
    try:
        for i, agent in enumerate(("agent:1", "agent:2")):
            gen = _gen(i + 1, agent=agent, max_tokens=64, ignore_eos=True)
            gen.on_done = lambda result, agent=agent: results.__setitem__(agent, result)
            worker.submit(gen)
        assert wait_until(lambda: len(worker.gens) == 2, timeout=60)
        worker.forget_agent("agent:1")  # ended, but its call is still being served
        assert wait_until(lambda: len(results) == 2, timeout=120)
        assert results["agent:1"].usage.completion_tokens == 64  # not cut short
        assert wait_until(lambda: worker.published.get("sched_agents") == 1, timeout=10)
        assert worker.backend.sched.agents() == {"agent:2"} and not worker.ended
    finally:
        worker.stop()
        worker.join(timeout=10)


def test_a_model_never_asked_for_is_told_nothing(tiny_dir: Path) -> None:
    worker = ModelWorker(_config(tiny_dir), post=lambda fn: fn())  # its thread waits to load
    for i in range(1000):
        worker.forget_agent(f"agent:{i}")
    assert worker.inbox.empty()  # nothing piles up for a worker that never drains


# --- the remote backend ---------------------------------------------------------------------------

class _Server(http.server.BaseHTTPRequestHandler):
    """Streams "a b c" as SSE, or answers 500 when the prompt says "fail"."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["messages"][0]["content"] == "fail":
            self.send_error(500, "broken on purpose")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for word in ("a", " b", " c"):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
        self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


def test_remote_streams_report_through_the_next_step() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    wakes = threading.Semaphore(0)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    backend = RemoteBackend(ModelConfig(name="far", source=url), wake=wakes.release)
    try:
        backend.admit(_gen(1, "hello"))
        backend.admit(_gen(2, "fail"))
        events = backend.step()
        assert {e.id for e in events if isinstance(e, Started)} == {1, 2}
        while not any(isinstance(e, (Finished, Failed)) and e.id == 1 for e in events) or not any(
                isinstance(e, (Finished, Failed)) and e.id == 2 for e in events):
            assert wakes.acquire(timeout=10), "a stream thread never woke the worker"
            events += backend.step()
        assert _texts(events)[1] == "a b c"
        (end,) = [e for e in events if isinstance(e, Finished)]
        assert end.id == 1 and end.text == "a b c" and end.usage == abi.Usage(4, 3)
        (fail,) = [e for e in events if isinstance(e, Failed)]
        assert fail.id == 2 and fail.code == abi.ErrorCode.EIO and "500" in fail.message
        assert not backend.sched.running() and backend.stats()["in_flight"] == 0
        backend.forget_agent("agent:1")
        assert backend.sched.agents() == set()
    finally:
        server.shutdown()


def test_a_calls_figures_are_published_before_its_answer(tiny_dir: Path) -> None:
    """Whoever reads sys.stats after an answer finds the call in the figures: the worker
    publishes, then answers (a fleet's served count once lagged an answer)."""
    worker = ModelWorker(_config(tiny_dir), post=lambda fn: fn())  # not started: no thread

    class Backend:
        served = 0.0

        def stats(self) -> dict[str, float]:
            return {"served": self.served}

    worker.backend = Backend()
    seen: list[float | None] = []
    for i, finish in enumerate((True, False), start=1):
        gen = _gen(i)
        gen.on_done = lambda _, : seen.append(worker.published.get("served"))
        gen.on_error = lambda *_: seen.append(worker.published.get("served"))
        worker.gens = {i: gen}
        worker.backend.served = float(i)  # what the step that ended the call counted
        worker._apply([Finished(i, "stop") if finish else Failed(i, abi.ErrorCode.EIO, "x")])
    assert seen == [1.0, 2.0]
