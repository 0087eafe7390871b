"""The kernel's HTTP door inside the sandbox (kernel/doors/http/agentdoor.py and
kernel/proc/forward.py): an unmodified `openai` program run as an agent reaches the OpenAI
API at OPENAI_BASE_URL with its own key, as itself, and nothing else: not with a stranger's
key, not without llm.chat, not the host's loopback; a flood of connections is bounded per agent."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from sdk.tokens import attenuate
from tests.conftest import TEST_TIER, KernelProcess, agent, wait_until

pytestmark = pytest.mark.skipif(TEST_TIER not in ("strict", "standard"),
                                reason="the door needs a sandbox with a uid of its own")


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[KernelProcess]:
    tmp = tmp_path_factory.mktemp("door")
    k = KernelProcess(tmp / "state")
    k.extra_args = ["--model", f"tiny={tiny_dir}", "--preload"]
    k.start()
    yield k
    assert k.stop() == 0


def run_agent(k: KernelProcess, caps: list[str], plan: dict | None = None,
              name: str = "oai") -> tuple[int, dict]:
    with k.connect() as admin:
        agent_id = admin.proc.spawn(agent("openai_agent"), name=name, caps=caps,
                                    argv=[json.dumps(plan or {})])
        info = admin.proc.wait(agent_id, timeout=120)
        out = admin.proc.logs(agent_id, "stdout").data.decode()
        err = admin.proc.logs(agent_id, "stderr").data.decode()
    assert info.exit_status == 0, err
    return agent_id, json.loads(out.strip().splitlines()[-1])


def test_an_unmodified_openai_program_chats_streams_and_calls_tools(door: KernelProcess) -> None:
    agent_id, steps = run_agent(door, ["llm.*"])
    assert steps["env"]["base_url"] == "http://127.0.0.1:8080/v1"
    assert steps["models"] == ["tiny"]
    assert steps["chat"]["tokens"] >= 1 and steps["chat"]["model"] == "tiny"
    assert steps["stream"]["chunks"] >= 2
    assert isinstance(steps["tools"], list), steps["tools"]
    assert steps["tools"][0]["name"] == "get_weather"
    with door.connect() as admin:
        stats = admin.sys.stats()
    # The calls were the agent's own: its principal, its accounting (what `agentos top` shows).
    mine = stats.callers.get(f"agent:{agent_id}")
    assert mine is not None and mine["syscalls"] >= 4 and mine["prompt_tokens"] > 0, mine


def test_without_llm_chat_it_is_refused(door: KernelProcess) -> None:
    _, steps = run_agent(door, ["llm.models"], name="nochat")
    assert steps["models"] == ["tiny"]
    assert steps["chat"]["status"] == 403 and "llm.chat" in steps["chat"]["message"]
    assert steps["stream"]["status"] == 403


def test_strangers_keys_are_401_and_audited(door: KernelProcess) -> None:
    with door.connect() as admin:
        other = admin.proc.spawn(agent("keyleaker"), name="neighbour", caps=["llm.*"])
        assert wait_until(lambda: admin.proc.logs(other, "stdout").data.strip())
        leaked = admin.proc.logs(other, "stdout").data.decode().strip()
    # Keys another agent could hold: its own (derived like ours), the admin's, an HTTP key, a
    # forged one. Only a token for this very agent opens its door.
    admin_key = (door.state_dir / "admin.token").read_text().strip()
    minted = door.cli("token", "mint", "--for", "http:eve", "--cap=llm.*")
    assert minted.returncode == 0, minted.stderr
    keys = [admin_key, minted.stdout.strip(), admin_key[:-4] + "AAAA",
            leaked, attenuate(leaked, ("allow", [["llm.models", None]]))]
    agent_id, steps = run_agent(door, ["llm.*"], {"keys": keys}, name="keyed")
    assert steps["models"] == ["tiny"]
    assert [steps[f"key{i}"].get("status") for i in range(len(keys))] == [401] * len(keys)
    with door.connect() as admin:
        denials = [r for r in admin.audit.read() if r.event == "deny"
                   and r.principal == f"agent:{agent_id}"]
        admin.proc.kill(other)
    assert len(denials) >= len(keys)


def test_the_host_loopback_is_out_of_reach(door: KernelProcess) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[object] = []
    _, steps = run_agent(door, ["llm.*"], {"probe": ["127.0.0.1", port], "sockets": True},
                         name="prober")
    # The probe's connect returned before the agent ended: a connection it made is in the
    # listener's backlog by now (accept returns it even once closed), so a short look suffices.
    listener.settimeout(0.5)
    try:
        accepted.append(listener.accept())
    except OSError:
        pass
    listener.close()
    assert "error" in steps["probe"] and not accepted
    # The filter lets it make TCP sockets for its own loopback, and no other family.
    for name in ("netlink", "packet", "vsock"):
        assert steps[name]["error"] == "PermissionError", steps[name]
    assert steps["models"] == ["tiny"]  # while its own door works


def test_a_connection_flood_is_bounded_per_agent(door: KernelProcess) -> None:
    with door.connect() as admin:
        flooder = admin.proc.spawn(agent("doorflood"), name="flooder", argv=["60"],
                                   caps=["llm.*"])
        try:
            # While the flooder holds its door's connections, a neighbour's door works.
            _, steps = run_agent(door, ["llm.*"], name="neighbour2")
            assert steps["chat"]["tokens"] >= 1
            info = admin.proc.wait(flooder, timeout=120)
            result = info.result
        finally:
            try:
                admin.proc.kill(flooder)
            except sdk.SyscallError:
                pass
    # agent_door_connections (16) are held at once, no more (17: the door closed one at its
    # keep-alive timeout and admitted the next before its FIN reached the flooder).
    assert 16 <= result["held"] <= 17, result
    assert result["refused"] >= 1 and result["after"] == 200, result
