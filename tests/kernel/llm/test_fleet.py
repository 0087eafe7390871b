"""A remote model as a fleet (kernel/llm/fleet.py, RemoteBackend in kernel/llm/backends.py): the
router's choices, and failover, against fake replicas that are real HTTP servers in threads and
misbehave on purpose: stall, refuse (4xx, 5xx), reset mid-stream, drip slowly, go away.

Each fake streams a reply that is a pure function of the conversation (WORDS, one per chunk), and
continues an assistant message it is asked to continue (`continue_final_message`) as a greedy
server would: so a resumed reply can be checked against the uninterrupted one.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.config import ModelConfig, ReplicaConfig
from kernel.llm import fleet
from kernel.llm.backends import RemoteBackend
from kernel.llm.events import Delta, Event, Failed, Finished
from kernel.llm.fleet import Replica, Router
from kernel.llm.remote import MAX_EVENT_BYTES, Hangup, RemoteError, RemoteModel
from kernel.llm.worker import Generation
from sdk import abi

WORDS = [f"w{i} " for i in range(8)]


class Fake(http.server.ThreadingHTTPServer):
    """One replica. `mode`: ok | stall | refuse (400) | fail (503) | reset (after `cut` chunks) |
    drip (`drip_s` between chunks) | huge (an endless event line); `probe_ok`: how GET /models
    answers."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.cut = 2
        self.drip_s = 0.0
        self.probe_ok = True
        self.no_continue = False  # refuse continue_final_message, as llama.cpp would (400)
        self.bodies: list[dict[str, Any]] = []
        self.peers: list[int] = []  # client ports, one per request
        self.hung_up = threading.Event()  # a stalled stream's client closed it
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's pool reuses connections
    server: Fake

    def do_GET(self) -> None:
        status = 200 if self.server.probe_ok else 503
        self.send_response(status)
        self.send_header("Content-Length", "11")
        self.end_headers()
        self.wfile.write(b'{"data": []}'[:11])

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.bodies.append(body)
        srv.peers.append(self.client_address[1])
        if srv.no_continue and body.get("continue_final_message"):
            srv.mode = "refuse"
        if srv.mode in ("refuse", "fail"):
            text = b"no such thing" if srv.mode == "refuse" else b"overloaded"
            self.send_response(400 if srv.mode == "refuse" else 503)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")  # then the connection is kept
        self.end_headers()
        if srv.mode == "huge":
            self._send(b"data: " + b"x" * (MAX_EVENT_BYTES + 10))
            self.close_connection = True
            return
        if srv.mode == "stall":
            self._stall()
            self.close_connection = True
            return
        words = WORDS[:body["max_tokens"]]
        last = body["messages"][-1]
        if body.get("continue_final_message"):  # greedy: go on from where the text is
            done = last["content"]
            assert "".join(WORDS).startswith(done), done
            words = WORDS[len(done.split()):][:body["max_tokens"]]
        for i, word in enumerate(words):
            if srv.mode == "reset" and i == srv.cut:
                self._reset()
                return
            self._send(_event({"choices": [{"index": 0, "delta": {"content": word}}]}))
            time.sleep(srv.drip_s)
        if srv.mode == "reset" and srv.cut >= len(words):  # after the last word, before the end
            self._reset()
            return
        self._send(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": len(words)}}))
        self._send(b"data: [DONE]\n\n")
        self._send(b"")

    def _reset(self) -> None:
        """RST: SO_LINGER with a zero timeout, then close."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _send(self, data: bytes) -> None:
        """One HTTP/1.1 chunk (empty: the last)."""
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stall(self) -> None:
        """Silent until the client goes (noted) or the server closes."""
        self.connection.settimeout(0.05)
        while not self.server.release.is_set():
            try:
                if not self.connection.recv(1, socket.MSG_PEEK):
                    self.server.hung_up.set()
                    return
            except TimeoutError:
                continue
            except OSError:
                self.server.hung_up.set()
                return

    def log_message(self, *args: object) -> None:
        pass


def _event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


@pytest.fixture
def fakes() -> Iterator[list[Fake]]:
    servers = [Fake(), Fake()]
    yield servers
    for server in servers:
        server.close()


def _backend(fakes: list[Fake], idle_s: float = 2.0, health_s: float = 0.0,
             **model: Any) -> tuple[RemoteBackend, threading.Semaphore]:
    wakes = threading.Semaphore(0)
    config = ModelConfig(name="fleet", remote_idle_s=idle_s, health_interval_s=health_s,
                         replicas=[ReplicaConfig(f.url, max_concurrency=2) for f in fakes],
                         **model)
    return RemoteBackend(config, wake=wakes.release), wakes


def _gen(gen_id: int, agent: str = "agent:1", **args: Any) -> Generation:
    chat = abi.ChatArgs(messages=[abi.ChatMessage(role="user", content="hi")], **args)
    return Generation(id=gen_id, agent=agent, args=chat, arrival=time.monotonic())


def _run(backend: RemoteBackend, wakes: threading.Semaphore, *gens: Generation,
         timeout: float = 15.0) -> tuple[dict[int, Finished | Failed], dict[int, str]]:
    """Admit the generations and step until each has ended: (its end, the text streamed)."""
    for gen in gens:
        backend.admit(gen)
    ends: dict[int, Finished | Failed] = {}
    streamed: dict[int, str] = {gen.id: "" for gen in gens}
    deadline = time.monotonic() + timeout
    while len(ends) < len(gens):
        events: list[Event] = backend.step()
        for e in events:
            if isinstance(e, Delta):
                streamed[e.id] += e.text
            elif isinstance(e, (Finished, Failed)):
                ends[e.id] = e
        if len(ends) < len(gens):
            assert wakes.acquire(timeout=max(0.0, deadline - time.monotonic())), ends
    return ends, streamed


def _replica(backend: RemoteBackend, fake: Fake) -> Replica:
    return next(r for r in backend.router.replicas if r.url == fake.url)


# --- the router's choices --------------------------------------------------------------------

def test_the_router_keeps_an_agent_on_its_replica_else_picks_the_least_loaded() -> None:
    replicas = [Replica(i, RemoteModel(f"http://127.0.0.1:9/r{i}/v1", "m"), 2) for i in (0, 1)]
    router = Router("m", replicas, wake=lambda: None, health_interval_s=0)
    r0, r1 = replicas
    try:
        assert router.pick("a") is r0  # both idle: the first
        router.begin(r0, "a")
        assert router.pick("b") is r1  # the least outstanding
        router.begin(r1, "b")
        assert router.pick("a") is r0 and router.pick("b") is r1  # affinity
        router.begin(r0, "a")  # r0 is full now: a spills over, and its affinity follows
        assert router.pick("a") is r1
        router.begin(r1, "a")
        assert router.pick("c") is None and router.capacity() == 4
        router.end(r0, served=True)
        router.end(r0, served=True)
        router.end(r1, served=True)
        assert router.pick("a") is r1 and router.pick("c") is r0
        router.failed(r1, "gone")  # drained: no new call, its calls in flight still count
        assert router.pick("a") is r0 and router.pick("a", avoid=[r0]) is None
        assert router.capacity() == 2 + 1 and not router.usable(avoid=[r0])
        assert router.error() is None and router.outages() == 1
        router.failed(r0, "gone too")
        assert router.error() == "http://127.0.0.1:9/r0/v1: gone too; " \
                                 "http://127.0.0.1:9/r1/v1: gone"
        assert router.figures()["replica.1.failures"] == 1
        assert router.figures()["replica.0.served"] == 2
        assert router.figures()["replica.1.outstanding"] == 1
        router.forget_agent("a")
        assert "a" not in router._affinity
    finally:
        router.close()


def test_with_affinity_off_every_call_goes_to_the_least_loaded_replica() -> None:
    config = ModelConfig.parse("m", {"replicas": [{"url": "http://a/v1"}], "affinity": False})
    assert config.affinity is False and ModelConfig.parse("m", {}).affinity is True
    with pytest.raises(ValueError, match="affinity must be true or false"):
        ModelConfig.parse("m", {"affinity": "no"})
    replicas = [Replica(i, RemoteModel(f"http://127.0.0.1:9/r{i}/v1", "m"), 2) for i in (0, 1)]
    router = Router("m", replicas, wake=lambda: None, health_interval_s=0, affinity=False)
    r0, r1 = replicas
    try:
        router.begin(r0, "a")
        router.end(r0, served=True)
        router.begin(r0, "b")  # r0 is busier now: a's next call leaves its last replica
        assert router.pick("a") is r1
        router.begin(r1, "a")
        router.end(r1, served=True)
        assert router.pick("a") is r1  # and goes where the load is least, not back to r0
    finally:
        router.close()


def test_a_fleet_is_configured_as_replicas() -> None:
    config = ModelConfig.parse("m", {"replicas": [
        {"url": "http://a:8000/v1/", "max_concurrency": 4, "api_key_env": "A_KEY"},
        {"url": "http://b:8000/v1"}], "max_concurrency": 8, "api_key_env": "KEY"})
    assert config.remote and config.source == "http://a:8000/v1"
    assert config.fleet() == [ReplicaConfig("http://a:8000/v1", 4, "A_KEY"),
                              ReplicaConfig("http://b:8000/v1", 8, "KEY")]
    one = ModelConfig.parse("m", {"source": "http://c/v1", "max_concurrency": 3})
    assert one.fleet() == [ReplicaConfig("http://c/v1", 3, None)]
    for bad, why in (({"url": "/models/x"}, "local engine"), ({"url": "http://a", "x": 1}, "x"),
                     ({"url": "http://a", "max_concurrency": 0}, ">= 1"), ("http://a", "table")):
        with pytest.raises(ValueError, match=why):
            ModelConfig.parse("m", {"replicas": [bad]})
    with pytest.raises(ValueError, match="no source"):
        ModelConfig.parse("m", {"source": "tiny", "replicas": [{"url": "http://a/v1"}]})


# --- routing and failover, end to end over HTTP --------------------------------------------------

def test_an_agents_calls_stay_on_one_replica_and_agents_spread(fakes: list[Fake]) -> None:
    backend, wakes = _backend(fakes)
    try:
        for i in range(3):  # one after another: the same replica each time
            ends, _ = _run(backend, wakes, _gen(i, agent="agent:a"))
            assert ends[i].text == "".join(WORDS)
        ends, _ = _run(backend, wakes, _gen(10, agent="agent:b"), _gen(11, agent="agent:c"))
        assert all(isinstance(e, Finished) for e in ends.values())
        a, b = (len(f.bodies) for f in fakes)
        assert sorted((a, b)) == [1, 4]  # a's three and one of b, c; the other went elsewhere
        stats = backend.stats()
        assert stats["replica.0.served"] + stats["replica.1.served"] == 5
        assert stats["replica.0.outstanding"] == stats["replica.1.outstanding"] == 0
        # The pool: a's calls on one replica reused kept-alive connections (fewer than calls).
        busy = fakes[0] if a > b else fakes[1]
        assert busy.bodies[0]["model"] == "fleet" and len(set(busy.peers)) == 1
    finally:
        backend.close()


@pytest.mark.parametrize("fault", ["fail", "stall", "down", "reset0"])
def test_a_call_that_got_nothing_is_retried_on_another_replica(fakes: list[Fake],
                                                                fault: str) -> None:
    first, second = fakes
    backend, wakes = _backend(fakes, idle_s=0.5)
    try:
        if fault == "down":
            first.close()
        elif fault == "reset0":
            first.mode, first.cut = "reset", 0
        else:
            first.mode = fault
        started = time.monotonic()
        ends, streamed = _run(backend, wakes, _gen(1, temperature=0.8))  # not even greedy
        assert isinstance(ends[1], Finished), ends
        assert ends[1].text == streamed[1] == "".join(WORDS)
        assert time.monotonic() - started < 3
        assert len(second.bodies) == 1 and not second.bodies[0].get("continue_final_message")
        bad = _replica(backend, first)
        assert not bad.healthy and bad.failures == 1 and backend.stats()["failovers"] == 1
        if fault == "stall":
            assert "sent nothing" in (bad.error or "")
        # Drained: the next call goes to the healthy one, whatever its affinity said.
        ends, _ = _run(backend, wakes, _gen(2, agent="agent:2"))
        assert isinstance(ends[2], Finished) and len(second.bodies) == 2
    finally:
        backend.close()


def test_a_refusal_is_einval_and_neither_retried_nor_drained(fakes: list[Fake]) -> None:
    for fake in fakes:
        fake.mode = "refuse"
    backend, wakes = _backend(fakes)
    try:
        ends, _ = _run(backend, wakes, _gen(1))
        assert isinstance(ends[1], Failed) and ends[1].code == abi.ErrorCode.EINVAL
        assert "400" in ends[1].message and "no such thing" in ends[1].message
        assert sum(len(f.bodies) for f in fakes) == 1
        assert all(r.healthy for r in backend.router.replicas)
    finally:
        backend.close()


def test_a_greedy_call_cut_mid_stream_is_resumed_elsewhere_with_the_same_output(
        fakes: list[Fake]) -> None:
    first, second = fakes
    first.mode, first.cut = "reset", 3
    backend, wakes = _backend(fakes[:1] + fakes[1:])
    try:
        ends, streamed = _run(backend, wakes, _gen(1, max_tokens=6))
        end = ends[1]
        assert isinstance(end, Finished), end
        # What an uninterrupted server sends, streamed once: no piece lost, none twice.
        assert end.text == streamed[1] == "".join(WORDS[:6])
        resumed = second.bodies[0]
        assert resumed["continue_final_message"] is True
        assert resumed["add_generation_prompt"] is False
        assert resumed["messages"][-1] == {"role": "assistant", "content": "".join(WORDS[:3])}
        assert resumed["max_tokens"] == 3
        assert end.usage.completion_tokens == 6
        assert backend.stats()["failovers"] == 1
    finally:
        backend.close()


def test_a_resume_the_other_server_refuses_is_eio_saying_what_was_delivered(
        fakes: list[Fake]) -> None:
    first, second = fakes
    first.mode, first.cut = "reset", 2
    second.no_continue = True
    backend, wakes = _backend(fakes)
    try:
        ends, streamed = _run(backend, wakes, _gen(1))
        end = ends[1]
        assert isinstance(end, Failed) and end.code == abi.ErrorCode.EIO, end
        assert streamed[1] == "w0 w1 " and "400" in end.message
        assert "2 pieces" in end.message and "resuming it on another replica failed" in end.message
        assert _replica(backend, second).healthy  # a refusal is not an outage
    finally:
        backend.close()


def test_a_call_cut_after_its_last_token_ends_at_its_length(fakes: list[Fake]) -> None:
    first, second = fakes
    first.mode, first.cut = "reset", 3
    backend, wakes = _backend(fakes)
    try:
        ends, streamed = _run(backend, wakes, _gen(1, max_tokens=3, temperature=0.5))
        end = ends[1]
        assert isinstance(end, Finished) and end.reason == "length", end
        assert end.text == streamed[1] == "".join(WORDS[:3]) and not second.bodies
    finally:
        backend.close()


def test_a_sampled_call_cut_mid_stream_fails_saying_what_was_delivered(
        fakes: list[Fake]) -> None:
    for fake in fakes:
        fake.mode, fake.cut = "reset", 2
    backend, wakes = _backend(fakes)
    try:
        ends, streamed = _run(backend, wakes, _gen(1, temperature=0.7))
        end = ends[1]
        assert isinstance(end, Failed) and end.code == abi.ErrorCode.EIO, end
        assert streamed[1] == "w0 w1 "
        assert "2 pieces" in end.message and "cut short" in end.message
        assert "only greedy" in end.message
    finally:
        backend.close()


def test_a_greedy_call_cut_inside_a_character_is_not_resumed(fakes: list[Fake]) -> None:
    """Text with a U+FFFD (a character cut between tokens) would be read back as other tokens:
    the continuation would not be the uninterrupted reply's, so the call fails instead."""
    WORDS[1] = "\ufffd "
    for fake in fakes:
        fake.mode, fake.cut = "reset", 2
    backend, wakes = _backend(fakes)
    try:
        ends, _ = _run(backend, wakes, _gen(1))
        assert isinstance(ends[1], Failed) and "whole characters" in ends[1].message
        assert sum(len(f.bodies) for f in fakes) == 1
        assert sum(len(f.bodies) for f in fakes) == 1  # not sent again
    finally:
        WORDS[1] = "w1 "
        backend.close()


def test_a_greedy_call_with_no_replica_left_fails_typed(fakes: list[Fake]) -> None:
    """Every replica breaks it: ETIMEDOUT from the last one's silence, saying what was sent."""
    first, second = fakes
    first.mode, first.cut = "reset", 1
    second.mode = "stall"
    first.probe_ok = second.probe_ok = False  # and neither comes back meanwhile
    backend, wakes = _backend(fakes, idle_s=0.5)
    try:
        ends, streamed = _run(backend, wakes, _gen(1))
        end = ends[1]
        assert isinstance(end, Failed) and end.code == abi.ErrorCode.ETIMEDOUT, end
        assert streamed[1] == "w0 " and "1 pieces" in end.message
        assert "no other healthy replica" in end.message
        assert backend.error is not None  # both drained: the model is unhealthy
    finally:
        backend.close()


def test_a_slow_drip_within_the_idle_limit_is_not_a_fault(fakes: list[Fake]) -> None:
    fakes[0].drip_s = fakes[1].drip_s = 0.1
    backend, wakes = _backend(fakes, idle_s=0.5)
    try:
        ends, _ = _run(backend, wakes, _gen(1, max_tokens=4))
        assert isinstance(ends[1], Finished) and ends[1].text == "".join(WORDS[:4])
        assert backend.stats()["failovers"] == 0
    finally:
        backend.close()


def test_a_drip_slower_than_the_idle_limit_is_resumed(fakes: list[Fake]) -> None:
    fakes[0].drip_s = 1.0  # the first word, then silence past the limit
    backend, wakes = _backend(fakes, idle_s=0.4)
    try:
        ends, streamed = _run(backend, wakes, _gen(1, max_tokens=4))
        assert isinstance(ends[1], Finished) and ends[1].text == streamed[1] == \
            "".join(WORDS[:4])
        assert fakes[1].bodies[0]["messages"][-1]["content"] == "w0 "
    finally:
        backend.close()


def test_a_drained_replica_is_probed_back_and_used_again(fakes: list[Fake],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "PROBE_FIRST_S", 0.1)
    first, second = fakes
    first.mode, first.probe_ok = "fail", False
    backend, wakes = _backend(fakes)
    try:
        ends, _ = _run(backend, wakes, _gen(1))
        assert isinstance(ends[1], Finished)
        bad = _replica(backend, first)
        assert not bad.healthy
        time.sleep(0.5)  # probes fail meanwhile: still drained, backed off
        assert not bad.healthy and bad.outages == 1
        first.mode, first.probe_ok = "ok", True
        deadline = time.monotonic() + 5
        while not bad.healthy:
            assert time.monotonic() < deadline, "never probed back"
            time.sleep(0.05)
        # agent:1's affinity went to the second; a new agent goes to the idle first again.
        second.drip_s = 0.3
        ends, _ = _run(backend, wakes, _gen(2, agent="agent:1"), _gen(3, agent="agent:9"))
        assert all(isinstance(e, Finished) for e in ends.values())
        assert len(first.bodies) == 2 and bad.served == 1
    finally:
        backend.close()


def test_a_failing_health_check_drains_an_idle_replica(fakes: list[Fake]) -> None:
    first, second = fakes
    first.probe_ok = False
    backend, wakes = _backend(fakes, health_s=0.1)
    try:
        bad = _replica(backend, first)
        deadline = time.monotonic() + 5
        while bad.healthy:
            assert time.monotonic() < deadline, "the health check never drained it"
            time.sleep(0.05)
        assert "health check failed" in (bad.error or "") and bad.failures == 0
        ends, _ = _run(backend, wakes, _gen(1))
        assert isinstance(ends[1], Finished) and not first.bodies and second.bodies
        first.probe_ok = True
        while not bad.healthy:
            assert time.monotonic() < deadline + 5, "never probed back"
            time.sleep(0.05)
    finally:
        backend.close()


# --- the client (kernel/llm/remote.py) ------------------------------------------------------------


def test_a_server_without_a_models_route_is_up_and_one_failing_is_down() -> None:
    """The health probe judges liveness: 404 or 501 (no such route, as http.server answers a
    GET it has no handler for) is a live server; a 5xx error or no answer is not."""
    status = {"code": 501}

    class PostOnly(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if status["code"] == 501:
                self.send_error(501)  # what BaseHTTPRequestHandler does without a do_GET
            else:
                self.send_response(status["code"])
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PostOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = RemoteModel(f"http://127.0.0.1:{server.server_address[1]}/v1", "m")
    try:
        for code, up in ((501, True), (404, True), (200, True), (500, False), (503, False)):
            status["code"] = code
            assert remote.probe(5.0) is up, code
    finally:
        server.shutdown()
        server.server_close()
    assert remote.probe(1.0) is False  # nobody there any more

def test_cancelling_closes_the_stream_so_the_server_frees_its_slot(fakes: list[Fake]) -> None:
    fake = fakes[0]
    fake.mode = "stall"
    remote = RemoteModel(fake.url, "m", timeout=30)
    hangup = Hangup()
    args = abi.ChatArgs(messages=[abi.ChatMessage(role="user", content="hi")])
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(remote.run(args, hangup,
                                                                     lambda t: None)))
    thread.start()
    while not fake.bodies:
        time.sleep(0.01)
    started = time.monotonic()
    hangup.set()
    thread.join(5)
    assert result and result[0][1] == "cancelled"  # type: ignore[index]
    assert fake.hung_up.wait(3) and time.monotonic() - started < 3
    remote.close()


def test_an_endless_event_line_is_eio(fakes: list[Fake]) -> None:
    fakes[0].mode = "huge"
    remote = RemoteModel(fakes[0].url, "m", timeout=5)
    args = abi.ChatArgs(messages=[abi.ChatMessage(role="user", content="hi")])
    with pytest.raises(RemoteError, match="over 1048576 bytes") as caught:
        remote.run(args, Hangup(), lambda t: None)
    assert caught.value.code == abi.ErrorCode.EIO
    remote.close()


def test_no_server_is_eio_unreached_and_silence_is_etimedout(fakes: list[Fake]) -> None:
    port = fakes[1].server_address[1]
    fakes[1].close()
    args = abi.ChatArgs(messages=[abi.ChatMessage(role="user", content="hi")])
    with pytest.raises(RemoteError) as caught:
        RemoteModel(f"http://127.0.0.1:{port}/v1", "m", timeout=1).run(args, Hangup(),
                                                                       lambda t: None)
    assert caught.value.unreached and caught.value.code == abi.ErrorCode.EIO
    fakes[0].mode = "stall"
    with pytest.raises(RemoteError) as caught:
        RemoteModel(fakes[0].url, "m", timeout=0.3).run(args, Hangup(), lambda t: None)
    assert caught.value.timed_out and caught.value.code == abi.ErrorCode.ETIMEDOUT


def test_the_openai_door_takes_continue_final_message_only_after_an_assistant_turn() -> None:
    from kernel.doors.http.openai import Refused, chat_args

    user = {"role": "user", "content": "hi"}
    partial = {"role": "assistant", "content": "w0 "}
    args = chat_args({"messages": [user, partial], "continue_final_message": True,
                      "add_generation_prompt": False})
    assert args.continue_final and args.messages[-1].content == "w0 "
    for body in ({"messages": [user], "continue_final_message": True},
                 {"messages": [user, partial], "continue_final_message": True,
                  "add_generation_prompt": True}):
        with pytest.raises(Refused):
            chat_args(body)
    assert not chat_args({"messages": [user, partial]}).continue_final


def test_the_configs_in_docs_fleets_md_load(tmp_path: Path) -> None:
    from kernel.config import Config

    text = (Path(__file__).parents[3] / "docs" / "fleets.md").read_text()
    blocks = re.findall(r"^```toml\n(.*?)^```", text, re.S | re.M)
    assert blocks
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.toml").write_text(block)
        config = Config.load(tmp_path / f"{i}.toml")
        if config.routes:  # the routes section's example
            assert config.routes["auto"].pick(8000, 256) == "small"
            assert config.routes["auto"].pick(8001, 256) == "large"
            assert config.routes["auto"].pick(10, 257) == "large"
            continue
        fleet_ = config.models["smollm2"]
        assert fleet_.remote and len(fleet_.fleet()) == 2
        assert fleet_.fleet()[1].api_key_env == "VLLM_B_KEY"
