"""Third-party agents on the real frameworks (issue 18.5), each an unmodified-style script in
tests/frameworks/ with its own requirements.txt: `agentos run` builds its environment from PyPI
(userland/venvs.py: uv, cached by the requirements' hash, so only a machine's first run builds,
in seconds), and the kernel runs it in the strict tier against the tiny model, answered
through its in-sandbox door. Each works as that agent; each is refused without llm.chat; none
reaches the host's loopback, another agent's door or an address it was not granted.

Marked `frameworks` (`-m "not frameworks"` leaves them out where PyPI cannot be reached)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_TIER, TESTS, KernelProcess, agent, wait_until
from userland import venvs

pytestmark = [
    pytest.mark.frameworks,
    pytest.mark.timeout(300),  # a machine's first run builds the environment inside the test
    pytest.mark.skipif(TEST_TIER != "strict", reason="the strict tier: the agents' own network "
                       "namespace, and code under pytest's 0700 tmp reachable"),
]

FRAMEWORKS = TESTS / "frameworks"


@dataclass
class World:
    kernel: KernelProcess
    env: dict[str, str]  # the CLI's: the venv cache
    urls: dict[str, str]  # host: the host's loopback; outside: an address not granted
    neighbour: str  # another agent's endpoint socket (its door is in its own namespace)
    accepted: list[str] = field(default_factory=list)  # what reached the listeners


def _listen(host: str, seen: list[str]) -> tuple[socket.socket, str]:
    listener = socket.create_server((host, 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            seen.append(host)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener, f"http://{host}:{listener.getsockname()[1]}/v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[World]:
    k = KernelProcess(tmp_path_factory.mktemp("frameworks") / "state")
    k.extra_args = ["--model", f"tiny={tiny_dir}", "--preload"]
    k.start()
    # Kept between runs (AGENTOS_VENV_DIR overrides): a machine builds each environment once.
    cache = os.environ.get(venvs.ENV_DIR) or str(venvs.cache_dir().parent / "test-venvs")
    accepted: list[str] = []
    host, host_url = _listen("127.0.0.1", accepted)
    outside, outside_url = _listen("127.0.0.2", accepted)
    with k.connect() as admin:
        other = admin.proc.spawn(agent("doorshow"), name="neighbour", caps=["llm.*"])
        assert wait_until(lambda: admin.proc.logs(other, "stdout").data.strip())
        door = admin.proc.logs(other, "stdout").data.decode().strip()
    yield World(k, {**os.environ, venvs.ENV_DIR: cache},
                {"host": host_url, "outside": outside_url}, door, accepted)
    host.close()
    outside.close()
    assert k.stop() == 0  # the neighbour with it


def run(world: World, name: str, caps: list[str], plan: dict) -> tuple[int, dict]:
    """`agentos run` the framework's agent (its environment built or found); its id and the
    JSON line it printed."""
    argv = [sys.executable, "-m", "userland.cli", "--state-dir", str(world.kernel.state_dir),
            "run", "--name", name, *(f"--cap={c}" for c in caps),
            str(FRAMEWORKS / name / "agent.py"), "--", json.dumps(plan)]
    spawned = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env=world.env)
    assert spawned.returncode == 0, spawned.stderr
    agent_id = int(spawned.stdout.strip())
    with world.kernel.connect() as admin:
        info = admin.proc.wait(agent_id, timeout=180)
        out = admin.proc.logs(agent_id, "stdout").data.decode()
        err = admin.proc.logs(agent_id, "stderr").data.decode()
    assert info.exit_status == 0, err[-3000:]
    return agent_id, json.loads(out.strip().splitlines()[-1])


def _works(name: str, steps: dict) -> None:
    """What each framework's own calls gave, through the door."""
    assert steps["chat"].get("error") is None, steps["chat"]
    if name == "openai_client":
        assert steps["models"] == ["tiny"]
        assert steps["chat"]["tokens"] >= 1
        assert steps["stream"]["chunks"] >= 2, steps["stream"]
        assert steps["tool"]["name"] == "get_weather", steps["tool"]
        assert set(steps["tool"]["args"]) == {"city"}
    elif name == "langchain":
        assert isinstance(steps["tool"], list), steps["tool"]
        assert [c["name"] for c in steps["tool"]] == ["Add"], steps["tool"]
        assert set(steps["structured"]) == {"name"}, steps["structured"]
    elif name == "openai_agents":
        assert steps["chat"]["tokens"] >= 1
        assert steps["stream"]["events"] >= 2, steps["stream"]
        assert steps["tool"]["output"] in ("sunny, 21", "sunny, 70"), steps["tool"]
    else:
        assert steps["chat"]["finished"] is True and steps["chat"]["tokens"] >= 1


NAMES = ["openai_client", "langchain", "openai_agents", "cerebrum"]


@pytest.mark.parametrize("name", NAMES)
def test_a_framework_agent_is_answered_through_its_door_and_reaches_nothing_else(
        world: World, name: str) -> None:
    plan = {**world.urls, "neighbour": world.neighbour}
    agent_id, steps = run(world, name, ["llm.chat", "llm.models"], plan)
    _works(name, steps)
    # Its calls were its own: its principal and accounting (what `agentos top` shows).
    with world.kernel.connect() as admin:
        mine = admin.sys.stats().callers.get(f"agent:{agent_id}")
    assert mine is not None and mine["prompt_tokens"] > 0, mine
    # The host's loopback is not its loopback; the proxy refuses what it was not granted
    # (403); another agent's door is not in its mount tree.
    assert "error" in steps["host"] and steps["host"]["status"] is None, steps["host"]
    assert steps["outside"]["status"] == 403, steps["outside"]
    assert steps["neighbour"]["error"] in ("FileNotFoundError", "PermissionError",
                                           "ConnectionRefusedError"), steps["neighbour"]
    assert world.accepted == []


@pytest.mark.parametrize("name", NAMES)
def test_a_framework_agent_without_llm_chat_is_refused(world: World, name: str) -> None:
    _, steps = run(world, name, ["llm.models"], {})
    assert steps["chat"]["status"] == 403, steps["chat"]
    assert "llm.chat" in steps["chat"]["message"], steps["chat"]


def test_the_demos_openai_program_streams_its_answer(world: World) -> None:
    """userland/agents/openai_chat, as `make demo` runs it (with SmolLM2 there)."""
    argv = [sys.executable, "-m", "userland.cli", "--state-dir", str(world.kernel.state_dir),
            "run", "--wait", "--name", "openai-chat", "--cap", "llm.chat", "--model", "tiny",
            str(ROOT / "userland" / "agents" / "openai_chat" / "agent.py"), "--", "hi"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=world.env)
    assert done.returncode == 0, done.stderr
    with world.kernel.connect() as admin:
        (mine,) = [a for a in admin.proc.ps() if a.name == "openai-chat" and a.venv]
        out = admin.proc.logs(mine.id, "stdout").data.decode()
    assert out.endswith("\n") and out.strip(), out
