"""Faults in what the kernel serves through: a remote model server that resets mid-stream, hangs
or sends garbage; a corrupted model cache; the embedding worker killed mid-call. Each: a typed
error within the call's deadline, a neighbour served meanwhile, the state visible in
`sys.stats().dependencies` (what `agentos top` and `/metrics` show), and recovery without a
restart. The remote server is a real local HTTP server that misbehaves on purpose."""

from __future__ import annotations

import http.server
import json
import os
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from tests.conftest import KernelProcess, wait_until

HELLO = [{"role": "user", "content": "hi"}]
# Each broken stream and each embedder kill is tried this many times (longer runs: more).
ROUNDS = int(os.environ.get("AGENTOS_FAULT_ROUNDS", "1"))
WORDS = ["one", "two", "three", "four"]

# What the server does, per model (the first path segment of its URL): ok | reset | cut |
# garbage | noise | error | hang.
MODES: dict[str, str] = {}
RELEASE = threading.Event()  # ends hanging handlers at teardown
CLOSED: set[str] = set()  # models whose client closed a hanging stream


def _chunk(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': text}}]})}\n\n"\
        .encode()


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the kernel's health probe: GET {base}/models
        if MODES.get(self.path.split("/")[1]) == "hang":
            RELEASE.wait(30)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = MODES.get(self.path.split("/")[1], "ok")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "noise":  # no event at all, then the end: nothing that parses
            self.wfile.write(os.urandom(512).replace(b"data:", b"") + b"\n")
            return
        for word in WORDS[:2]:
            self.wfile.write(_chunk(word + " "))
        self.wfile.flush()
        if mode == "reset":  # RST: SO_LINGER with a zero timeout, then close
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            return
        if mode == "cut":  # a clean close halfway: no finish_reason, no [DONE]
            return
        if mode == "garbage":
            self.wfile.write(b"data: [1, 2, 3]\n\n")
            return
        if mode == "error":  # the server's own failure, reported the OpenAI way
            self.wfile.write(b'data: {"error": {"message": "upstream ran out of memory"}}\n\n')
            return
        if mode == "hang":  # silent, until the client goes (noted in CLOSED) or teardown
            while not RELEASE.is_set():
                if select.select([self.connection], [], [], 0.05)[0]:
                    try:
                        gone = not self.connection.recv(1, socket.MSG_PEEK)
                    except OSError:
                        gone = True
                    if gone:
                        CLOSED.add(self.path.split("/")[1])
                        return
            return
        for word in WORDS[2:]:
            self.wfile.write(_chunk(word + " "))
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
        self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    RELEASE.set()
    srv.shutdown()


CORRUPTIONS = ("missing", "truncated", "garbage")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def store(store_root: Path, tiny_dir: Path) -> Path:
    """The kernel's model store, filled when a test first needs it (the kernel loads models
    on their first call): the tiny model once per corruption (`cached-<how>`), and a pristine
    copy to repair them from."""
    from sdk.models import seal

    # What a pull of tiny_dir stores, without its conversion (a load and save: seconds).
    shutil.copytree(tiny_dir, store_root / "pristine")
    seal("pristine", {"kind": "directory", "path": str(tiny_dir)},
         {"architecture": "LlamaForCausalLM", "dtype": "float32", "chat_template": True},
         store_root / "pristine")
    for how in CORRUPTIONS:
        _repair(store_root, f"cached-{how}")
    return store_root


def _repair(store: Path, name: str) -> None:
    shutil.rmtree(store / name, ignore_errors=True)
    shutil.copytree(store / "pristine", store / name)


@pytest.fixture(scope="module")
def fk(tmp_path_factory: pytest.TempPathFactory, server: str,
       store_root: Path) -> Iterator[KernelProcess]:
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "faults").mkdir()
    models = "".join(
        f'[models.{name}]\nsource = "{server}/{name}/v1"\nremote_idle_s = 1.0\n'
        for name in ("steady", "reset", "cut", "garbage", "noise", "hang", "error"))
    models += f'[models.slow]\nsource = "{server}/slow/v1"\nremote_idle_s = 30.0\n'
    (tmp / "kernel.toml").write_text(
        '[kernel]\nmemory_embedder = "hash-slow"\nrestart_backoff = 0.3\n'
        + models + "".join(f'[models.cached-{how}]\nsource = "cached-{how}"\n'
                           for how in CORRUPTIONS))
    k = KernelProcess(tmp / "state", env={"AGENTOS_FAULTS": str(tmp / "faults"),
                                          "AGENTOS_MODEL_DIR": str(store_root)})
    k.module = "tests.faulty_kernel"
    k.extra_args = ["--config", str(tmp / "kernel.toml")]
    k.faults = tmp / "faults"  # type: ignore[attr-defined]
    k.start()
    yield k
    assert k.stop() == 0


def _dep(conn: sdk.Connection, kind: str, name: str) -> sdk.abi.DependencyInfo:
    return {(d.kind, d.name): d for d in conn.sys.stats().dependencies}[(kind, name)]


def _shown_as(conn: sdk.Connection, kind: str, name: str, state: str) -> None:
    """The state in /metrics (the HTTP door renders this snapshot) and in `agentos top`."""
    import io

    from rich.console import Console

    from kernel.doors.http.metrics import render
    from userland import top

    stats = conn.sys.stats()
    text = render(stats, {"open": 0, "peers": 0, "accepted": 0, "refused": {}}).decode()
    labels = f'kind="{kind}",name="{name}"'
    assert f"agentos_dependency_up{{{labels}}} {float(state == 'ready')}" in text, text
    assert f'agentos_dependency_state{{{labels},state="{state}"}} 1.0' in text, text
    console = Console(file=io.StringIO(), width=200)
    console.print(top.render(top.Sample(time.monotonic(), stats, []), None))
    row = next(line for line in console.file.getvalue().splitlines()
               if f" {name} " in line and kind in line)
    assert state in row, row


def _steady(conn: sdk.Connection) -> None:
    """The neighbour: another model on the same server, and a non-LLM call."""
    assert conn.llm.chat(HELLO, model="steady").message.content == "one two three four "
    conn.memory.add("a neighbour's note", namespace="user/neighbour")


# --- a remote model server ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reset", "cut", "garbage", "noise"])
def test_a_broken_remote_stream_is_eio_never_a_silent_finish(fk: KernelProcess,
                                                               mode: str) -> None:
    with fk.connect(timeout=30) as conn:
        for outage in range(1, ROUNDS + 1):
            MODES[mode] = mode
            pieces = []
            started = time.monotonic()
            with pytest.raises(sdk.KernelFault):  # EIO: the stream ends with an error
                for delta in conn.llm.stream(HELLO, model=mode, timeout=20):
                    pieces.append(delta.text)
            assert time.monotonic() - started < 5
            # What arrived before the break arrived, and was not passed off as the whole reply.
            assert "".join(pieces) in ("", "one ", "one two ")
            _steady(conn)
            dep = _dep(conn, "model", mode)
            assert dep.restarts == outage and dep.state in ("unhealthy", "ready"), dep
            # The probe finds the server answering again: the model serves (and breaks) again.
            MODES[mode] = "ok"
            assert wait_until(lambda: _dep(conn, "model", mode).state == "ready", timeout=10)
            assert conn.llm.chat(HELLO, model=mode).message.content == "one two three four "


def test_an_error_event_mid_stream_is_eio_with_the_servers_reason(fk: KernelProcess) -> None:
    """The server failed the request and said so: EIO with its words; it is up, so the model
    stays healthy."""
    MODES["error"] = "error"
    with fk.connect(timeout=30) as conn:
        with pytest.raises(sdk.KernelFault, match="upstream ran out of memory"):
            conn.llm.chat(HELLO, model="error", timeout=20)
        dep = _dep(conn, "model", "error")
        assert (dep.state, dep.restarts) == ("ready", 0), dep
        MODES["error"] = "ok"
        assert conn.llm.chat(HELLO, model="error").message.content == "one two three four "


def test_a_hanging_remote_server_is_etimedout_unhealthy_then_probed_back(
        fk: KernelProcess) -> None:
    MODES["hang"] = "hang"
    with fk.connect(timeout=30) as conn:
        pieces = []
        started = time.monotonic()
        with pytest.raises(sdk.TimedOut):
            for delta in conn.llm.stream(HELLO, model="hang", timeout=20):
                pieces.append(delta.text)
        assert time.monotonic() - started < 5  # its idle limit (1 s), not the call's 20 s
        assert "".join(pieces) == "one two "
        _steady(conn)
        dep = _dep(conn, "model", "hang")
        assert dep.state == "unhealthy" and "sent nothing" in (dep.error or ""), dep
        _shown_as(conn, "model", "hang", "unhealthy")
        # While it is unhealthy (its probes hang too), calls are refused at once, retryable.
        started = time.monotonic()
        with pytest.raises(sdk.TryAgain, match="unhealthy"):
            conn.llm.chat(HELLO, model="hang")
        assert time.monotonic() - started < 1
        MODES["hang"] = "ok"
        assert wait_until(lambda: _dep(conn, "model", "hang").state == "ready", timeout=15)
        assert conn.llm.chat(HELLO, model="hang").message.content == "one two three four "


def test_a_deadline_before_the_idle_limit_is_etimedout_and_closes_the_stream(
        fk: KernelProcess) -> None:
    """A slow server is not a broken one: the call ends at its own deadline, its stream is
    closed at once (not at the 30 s idle limit), and the model stays healthy."""
    MODES["slow"] = "hang"
    with fk.connect(timeout=30) as conn:
        started = time.monotonic()
        with pytest.raises(sdk.TimedOut):
            conn.llm.chat(HELLO, model="slow", timeout=1)
        assert time.monotonic() - started < 3
        assert wait_until(lambda: "slow" in CLOSED, timeout=3)  # the kernel hung up
        assert _dep(conn, "model", "slow").state == "ready"
        MODES["slow"] = "ok"
        assert conn.llm.chat(HELLO, model="slow").message.content == "one two three four "


# --- the model cache -------------------------------------------------------------------------

def _break(directory: Path, how: str) -> str:
    """Damage the stored model; what the error must name."""
    if how == "missing":
        (directory / "config.json").unlink()
        return "config.json: missing"
    if how == "truncated":
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return "model.safetensors"
    garbage = directory / "tokenizer.json"  # the same size: only loading can tell
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    return "failed to load"


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupted_model_cache_is_eio_naming_the_repair(fk: KernelProcess, store: Path,
                                                          how: str) -> None:
    name = f"cached-{how}"
    what = _break(store / name, how)
    with fk.connect(timeout=60) as conn:
        assert _dep(conn, "model", name).state == "unloaded"
        with pytest.raises(sdk.KernelFault) as caught:
            conn.llm.chat(HELLO, model=name, max_tokens=2)
        message = str(caught.value)
        assert f"'{name}'" in message and what in message, message
        assert f"agentos model pull {name} --force" in message, message
        _steady(conn)
        _shown_as(conn, "model", name, "failed")
        # Asked again unrepaired: the same answer at once, no second load.
        with pytest.raises(sdk.KernelFault):
            conn.llm.chat(HELLO, model=name, max_tokens=2)
        assert _dep(conn, "model", name).restarts == 0
        _repair(store, name)
        # Once repaired, the next call loads it: no kernel restart.
        result = conn.llm.chat(HELLO, model=name, max_tokens=2)
        assert result.usage.completion_tokens > 0
        assert _dep(conn, "model", name).state == "ready"


# --- the embedding worker ----------------------------------------------------------------------

def test_the_embedder_killed_mid_call_is_eio_restarted_and_writes_stay(fk: KernelProcess) -> None:
    faults: Path = fk.faults  # type: ignore[attr-defined]
    ns = "user/embedder-chaos"
    outcomes: dict[str, object] = {}

    def call(what: str, text: str) -> None:
        with fk.connect(timeout=30) as own:
            try:
                outcomes[what] = (own.memory.embed([text]) if what == "embed" else
                                  own.memory.add(text, namespace=ns))
            except sdk.SyscallError as exc:
                outcomes[what] = exc

    with fk.connect(timeout=30) as conn:
        acked = {conn.memory.add(f"note {i} about apples", namespace=ns): f"note {i} about apples"
                 for i in range(20)}
        for kill in range(1, ROUNDS + 1):
            pear = f"a pear numbered {kill} in the middle"
            (faults / "slow").touch()
            callers = [threading.Thread(target=call, args=(what, pear))
                       for what in ("embed", "add")]
            callers[0].start()
            time.sleep(0.5)  # the embed call is in the embedder now, ~3 s from done
            callers[1].start()  # queued behind it
            time.sleep(0.2)
            started = time.monotonic()
            (faults / "kill").touch()
            assert wait_until(lambda: (faults / "killed").exists(), timeout=5)
            (faults / "killed").unlink()
            (faults / "slow").unlink()
            callers[0].join(10)
            # The call the dead thread held: EIO at once, not its 30 s deadline.
            assert isinstance(outcomes["embed"], sdk.KernelFault), outcomes
            assert time.monotonic() - started < 3
            # Meanwhile every other call is served (keywords, another model, a write).
            _steady(conn)
            assert conn.memory.search("apples", namespace=ns, mode="keyword")
            # Restarted with backoff, its state visible; the queued write acknowledged whole.
            assert wait_until(lambda: _dep(conn, "embedder", "hash").restarts == kill,  # noqa: B023
                              timeout=10)
            assert wait_until(lambda: _dep(conn, "embedder", "hash").state == "ready", timeout=10)
            _shown_as(conn, "embedder", "hash", "ready")
            assert "SystemExit" in (_dep(conn, "embedder", "hash").error or "")
            callers[1].join(10)
            added = outcomes["add"]
            assert isinstance(added, int), outcomes
            acked[added] = pear
            for memory_id, content in acked.items():
                assert conn.memory.get(memory_id, namespace=ns).content == content
            # And it embeds again: a vector search finds the write made while it was dying.
            hits = conn.memory.search(pear, namespace=ns, mode="vector", k=1)
            assert [h.id for h in hits] == [added]
            assert len(conn.memory.embed(["y"]).vectors) == 1
