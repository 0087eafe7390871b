"""The HTTP front doors against a booted kernel with a tiny model: the official `openai` client
(sync and streaming), AIOS's `aios-agent-sdk` client, auth failures, malformed bodies, a client
that leaves mid-stream, /metrics, kernel A using kernel B as a remote model, and `agentos top`
under tmux."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx  # what the openai client itself uses
import openai
import pytest

from sdk.tokens import attenuate
from tests.conftest import ROOT, KernelProcess, wait_until

HELLO = [{"role": "user", "content": "hello there"}]



@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[KernelProcess]:
    tmp = tmp_path_factory.mktemp("web")
    # The hashing embedder on the worker thread: /v1/embeddings parks as it would with MiniLM.
    (tmp / "kernel.toml").write_text('[kernel]\nmemory_embedder = "hash-slow"\n')
    k = KernelProcess(tmp / "state")
    k.extra_args = ["--model", f"tiny={tiny_dir}", "--preload", "--http", "127.0.0.1:0",
                    "--config", str(tmp / "kernel.toml")]
    k.start()
    yield k
    assert k.stop() == 0


def base_url(k: KernelProcess) -> str:
    return f"http://{(k.state_dir / 'run' / 'http').read_text().strip()}"


def mint(k: KernelProcess, *caps: str, name: str = "alice", ttl: float | None = None) -> str:
    args = ["token", "mint", "--for", f"http:{name}", *(f"--cap={c}" for c in caps)]
    if ttl is not None:
        args += ["--ttl", str(ttl)]
    out = k.cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def key(web: KernelProcess) -> str:
    return mint(web, "llm.*", "sys.stats")


@pytest.fixture(scope="module")
def client(web: KernelProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(web) + "/v1", api_key=key, max_retries=0)


def test_openai_client_chat_equals_the_sdk_path(web: KernelProcess,
                                                 client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert model.id == "tiny"
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12,
                                           temperature=0)
    with web.connect() as conn:
        direct = conn.llm.chat(HELLO, max_tokens=12)
    assert reply.choices[0].message.content == direct.message.content
    assert reply.choices[0].finish_reason == direct.finish_reason
    assert reply.usage.completion_tokens == direct.usage.completion_tokens
    with web.connect() as conn:
        callers = conn.sys.stats().callers
    assert callers["http:alice"]["completion_tokens"] >= direct.usage.completion_tokens


def test_openai_client_streams_the_same_text(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16,
                                           temperature=0.8, seed=3)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16,
                                            temperature=0.8, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "look up",
    "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}},
                   "required": ["q"], "additionalProperties": False}}}


def test_json_object_and_required_tool_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24,
                                           response_format={"type": "json_object"})
    choice = reply.choices[0]
    # Cut short by max_tokens, the text is still the start of an object; else it is one.
    assert choice.message.content.lstrip().startswith("{")
    if choice.finish_reason != "length":
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content), dict)
    # A random model would name no tool; the grammar makes it call one, arguments valid.
    for tool_choice in ("required", {"type": "function", "function": {"name": "lookup"}}):
        reply = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=64, tools=[LOOKUP], temperature=0,
            tool_choice=tool_choice, parallel_tool_calls=False)
        (call,) = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"
        assert len(json.loads(call.function.arguments)["q"]) <= 8


def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=6)
        population: int = Field(ge=0, le=10**7)
        capital: bool

    for seed in range(3):
        reply = client.chat.completions.parse(model="tiny", messages=HELLO, response_format=City,
                                              max_tokens=64, temperature=1.0, seed=seed)
        city = reply.choices[0].message.parsed
        assert isinstance(city, City) and reply.choices[0].finish_reason == "stop"


def test_vllm_guided_extensions(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16,
                                           extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", reply.choices[0].message.content)
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16,
                                           extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")


def test_structures_that_cannot_be_enforced_are_400(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="unclosed group"):
            client.chat.completions.create(model="tiny", messages=HELLO, response_format=bad,
                                           stream=stream)
    with pytest.raises(openai.BadRequestError, match="one structure at a time"):
        client.chat.completions.create(model="tiny", messages=HELLO, extra_body={
            "guided_regex": "a", "guided_choice": ["a"]})
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert reply.choices[0].message.content is not None  # the model serves on


def test_langchain_tools_and_structured_output(web: KernelProcess, key: str) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, ConfigDict, Field

    # Bounded fields: a random model would otherwise write digits until max_tokens.
    class Add(BaseModel):
        """Add two integers."""

        a: int = Field(ge=0, le=99)
        b: int = Field(ge=0, le=99)

    class City(BaseModel):
        """A city."""

        model_config = ConfigDict(extra="forbid")  # no other keys: nothing unbounded
        name: str = Field(max_length=6)
        population: int = Field(ge=0, le=10**7)

    # The random model spells the call's fixed text a character a token: room for ~60 tokens.
    llm = ChatOpenAI(base_url=base_url(web) + "/v1", api_key=key, model="tiny", temperature=0,
                     max_tokens=120, max_retries=0)
    message = llm.bind_tools([Add], tool_choice="Add").invoke("What is 2 plus 3?")
    (call,) = message.tool_calls
    assert call["name"] == "Add" and Add.model_validate(call["args"])
    for method in ("function_calling", "json_schema"):
        city = llm.with_structured_output(City, method=method).invoke("Name a city.")
        assert isinstance(city, City), method


def test_aios_query_enforces_structure(web: KernelProcess, key: str) -> None:
    url = base_url(web) + "/query"
    auth = {"Authorization": f"Bearer {key}"}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = httpx.post(url, headers=auth, timeout=60, json={
        "query_type": "llm", "agent_name": "x", "query_data": {
            "messages": HELLO, "max_new_tokens": 32, "response_format": {
                "type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}})
    assert r.status_code == 200, r.text
    assert set(json.loads(r.json()["response"]["response_message"])) == {"ok"}
    r = httpx.post(url, headers=auth, timeout=60, json={
        "query_type": "llm", "agent_name": "x", "query_data": {
            # ~60 tokens of fixed text, then up to 8 characters of a byte-level vocabulary's
            # up to 4 tokens each (which ones depends on whether the prompt was cached)
            "messages": HELLO, "max_new_tokens": 160, "action_type": "tool_use",
            "tools": [LOOKUP], "parallel_tool_calls": False}})
    assert r.status_code == 200 and r.json()["response"]["tool_calls"], r.text
    (call,) = r.json()["response"]["tool_calls"]
    assert call["name"] == "lookup" and set(call["parameters"]) == {"q"}
    r = httpx.post(url, headers=auth, timeout=60, json={
        "query_type": "llm", "agent_name": "x", "query_data": {
            "messages": HELLO, "guided_regex": "(("}})
    assert r.status_code == 400 and "unclosed group" in r.json()["detail"]


def test_tool_calls_in_openai_shape() -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from kernel.doors.http import openai as wire
    from sdk import abi

    call = abi.ToolCall(id="call_1", function=abi.FunctionCall("lookup", '{"q": "x"}'))
    result = abi.ChatResult(model="tiny", message=abi.ChatMessage(
        role="assistant", tool_calls=[call]), finish_reason="tool_calls",
        usage=abi.Usage(5, 7))
    whole = ChatCompletion.model_validate(wire.completion("chatcmpl-1", result))
    (got,) = whole.choices[0].message.tool_calls
    assert (got.id, got.function.name, got.function.arguments) == (
        "call_1", "lookup", '{"q": "x"}')
    assert whole.choices[0].finish_reason == "tool_calls" and whole.usage.total_tokens == 12
    events = wire.final_chunks("chatcmpl-1", result, include_usage=True, content_sent=False)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    assert chunks[0].choices[0].delta.tool_calls[0].function.name == "lookup"
    assert chunks[1].choices[0].finish_reason == "tool_calls"
    assert chunks[2].usage.completion_tokens == 7
    args = wire.chat_args({"messages": HELLO, "tools": [{"type": "function", "function": {
        "name": "a"}}, {"type": "function", "function": {"name": "b"}}],
        "tool_choice": {"type": "function", "function": {"name": "b"}}, "stop": "END",
        "response_format": {"type": "json_schema", "json_schema": {}}, "stream": True,
        "parallel_tool_calls": False})
    assert [t["function"]["name"] for t in args.tools] == ["b"]
    assert args.tool_choice == "required" and args.stop == ["END"]
    assert args.response_format == "json" and not args.stream  # tools: answered whole
    assert not args.parallel_tool_calls
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    args = wire.chat_args({"messages": HELLO, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}})
    assert args.json_schema == schema and args.response_format == "text"


def test_auth_failures_are_401_and_403(web: KernelProcess, key: str) -> None:
    url = base_url(web) + "/v1"
    cases = {
        key[:-3] + ("AAA" if not key.endswith("AAA") else "BBB"): openai.AuthenticationError,
        (web.state_dir / "admin.token").read_text().strip(): openai.AuthenticationError,
        mint(web, "llm.chat@llm/other", name="carol"): openai.PermissionDeniedError,
        mint(web, "llm.chat", name="dave", ttl=0.001): openai.AuthenticationError,
        # Attenuated offline by its holder: still an HTTP key, now only for another model.
        attenuate(key, ("allow", [["llm.chat", "llm/other"]])): openai.PermissionDeniedError,
    }
    for token, error in cases.items():
        c = openai.OpenAI(base_url=url, api_key=token, max_retries=0)
        with pytest.raises(error) as info:
            c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        body = info.value.body
        assert body["message"] and body["type"] in ("authentication_error", "permission_error")
    r = httpx.get(url + "/models")  # no token at all (the openai client insists on one)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    with web.connect() as conn:
        stats = conn.sys.stats()
    assert stats.denials.get("llm", 0) >= 2


def test_bad_bodies_are_400_with_a_clear_message(web: KernelProcess, key: str) -> None:
    url = base_url(web) + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers=auth)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("malformed JSON body")
    for body, words in (({"model": "tiny"}, "'messages'"),
                        ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
                        ({"messages": HELLO, "n": 2}, "n=1"),
                        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
                        ({"messages": HELLO, "frobnicate": 1}, "frobnicate")):
        r = httpx.post(url, json=body, headers=auth)
        assert r.status_code == 400, body
        assert words in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "nope", "messages": HELLO}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # Over the model's prompt cap (16 bytes per token of its 4096-token context): refused
    # before it is tokenized, as from any door.
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 70000}]},
                   headers=auth)
    assert r.status_code == 400 and "prompt too long" in r.json()["error"]["message"]
    r = httpx.post(base_url(web) + "/v1/embeddings", json={"input": [1, 2]}, headers=auth)
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    r = httpx.post(base_url(web) + "/v1/embeddings", json={"input": "x"}, headers=auth)
    assert r.status_code == 403  # this key has no memory.embed


def test_client_leaving_mid_stream_cancels_its_generation(web: KernelProcess, key: str) -> None:
    with web.connect() as conn:
        before = conn.sys.stats().errors.get("ECANCELED", 0)
    # ignore_eos (vLLM's extension): a generation that cannot end before the client leaves.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on forever"}],
            "max_tokens": 3000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base_url(web) + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += '"content"' in line
            if seen >= 3:
                break

    def cancelled() -> bool:
        with web.connect() as conn:
            return conn.sys.stats().errors.get("ECANCELED", 0) > before

    assert wait_until(cancelled, timeout=20), web.log()[-2000:]
    # Once cancelled, the worker holds no generation after the next call's last step
    # (published just after it).
    with web.connect() as conn:
        conn.llm.chat(HELLO, max_tokens=2)
        before = conn.sys.stats().errors.get("ECANCELED", 0)
    assert wait_until(lambda: _generations(web) == 0, timeout=5)
    # Not streamed: the client hangs up while waiting for the whole answer.
    host, port = base_url(web)[len("http://"):].split(":")
    payload = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer "
                     + key.encode() + b"\r\nContent-Length: " + str(len(payload)).encode()
                     + b"\r\n\r\n" + payload)
        assert wait_until(lambda: _generations(web) > 0, timeout=10)
    assert wait_until(cancelled, timeout=20), web.log()[-2000:]


def _generations(k: KernelProcess) -> float:
    with k.connect() as conn:
        return conn.sys.stats().models.get("tiny", {}).get("generations", 0)


def test_aios_sdk_llm_chat_with_the_token_in_the_base_url(web: KernelProcess) -> None:
    requests = pytest.importorskip("requests")
    pytest.importorskip("cerebrum")
    from cerebrum.client import Cerebrum
    from cerebrum.llm.communication import LLMQuery

    class Query(LLMQuery):  # the PyPI release's query plus `llms`, as AIOS's current SDK has
        llms: list[dict[str, Any]] | None = None

    token = mint(web, "llm.chat", name="aios-writer")
    client = Cerebrum(base_url=f"{base_url(web)}/aios/{token}")
    result = client._query_llm(agent_name="someone-else", query=Query(
        messages=[{"role": "user", "content": "write a haiku"}], action_type="chat",
        llms=[{"name": "gpt-4o-mini"}, {"name": "tiny", "max_tokens": 8}]))
    response = result["response"]
    assert response["finished"] is True and isinstance(response["response_message"], str)
    assert response["model"] == "tiny" and response["usage"]["completion_tokens"] <= 8
    assert set(result) >= {"start_times", "end_times", "waiting_times", "turnaround_times"}
    with web.connect() as conn:
        callers = conn.sys.stats().callers
    assert "http:aios-writer" in callers and not any("someone-else" in p for p in callers)
    # This key has no memory rights: the memory manager's refusal, in AIOS's error shape.
    with pytest.raises(requests.HTTPError) as info:
        client._post("/query", {"query_type": "memory", "agent_name": "x", "query_data": {
            "operation_type": "add_memory", "params": {"content": "a note"}}})
    assert info.value.response.status_code == 403
    assert info.value.response.json()["response"]["success"] is False
    r = httpx.post(base_url(web) + "/query", json={"query_type": "llm", "agent_name": "x",
                                                   "query_data": {"messages": HELLO}})
    assert r.status_code == 401


def test_metrics_in_prometheus_format(web: KernelProcess, key: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with web.connect() as conn:  # its own traffic, whichever tests ran before
        conn.llm.chat(HELLO, max_tokens=1)
    r = httpx.get(base_url(web) + "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("agentos_syscalls", "agentos_syscall_duration_seconds", "agentos_llm_queue",
                 "agentos_llm_tokens_per_second", "agentos_llm_preemptions",
                 "agentos_denials", "agentos_memory"):
        assert name in families, name
    counts = {s.labels["call"]: s.value for s in families["agentos_syscalls"].samples
              if s.name == "agentos_syscalls_total"}
    assert counts["llm.chat"] >= 1
    figures = {s.labels["figure"] for s in families["agentos_memory"].samples}
    assert {"resident", "ram_bytes", "embedded"} <= figures
    up = {(s.labels["kind"], s.labels["name"]): s.value
          for s in families["agentos_dependency_up"].samples}
    assert up[("embedder", "hash")] == 1.0 and up[("model", "tiny")] == 1.0, up
    no_stats = mint(web, "llm.chat", name="eve")
    r = httpx.get(base_url(web) + "/metrics", headers={"Authorization": f"Bearer {no_stats}"})
    assert r.status_code == 403


def test_kernel_uses_another_kernel_as_a_remote_model(web: KernelProcess, key: str,
                                                      tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text(f'[models.far]\nsource = "{base_url(web)}/v1"\nremote_model = "tiny"\n'
                      'api_key_env = "FAR_KEY"\n')
    a = KernelProcess(tmp_path / "a", env={"FAR_KEY": key})
    a.extra_args = ["--config", str(config)]
    a.start()
    try:
        with a.connect() as conn:
            far = conn.llm.chat(HELLO, model="far", max_tokens=12)
            streamed = "".join(d.text for d in conn.llm.stream(HELLO, model="far",
                                                                 max_tokens=12))
        with web.connect() as conn:
            near = conn.llm.chat(HELLO, max_tokens=12)
        assert far.message.content == near.message.content == streamed
        assert far.usage.completion_tokens == near.usage.completion_tokens
        # A turn that called a tool reaches B whole (the prompt would differ otherwise).
        convo = [*HELLO, {"role": "assistant", "tool_calls": [
            {"id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
        with a.connect() as conn:
            far = conn.llm.chat(convo, model="far", max_tokens=8)
        with web.connect() as conn:
            near = conn.llm.chat(convo, max_tokens=8)
        assert far.message.content == near.message.content
        assert far.usage.prompt_tokens == near.usage.prompt_tokens
    finally:
        assert a.stop() == 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_renders_under_tmux_and_q_quits(web: KernelProcess, client: openai.OpenAI) -> None:
    # Something for top to show, whichever tests ran before: the model and alice's key.
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    session = f"agentos-top-{int(time.time() * 1000)}"
    command = (f"{sys.executable} -m userland.cli --state-dir {web.state_dir} top "
               "--interval 0.3")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "140", "-y", "40",
                    "-c", str(ROOT), command], check=True)
    try:
        def frame() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True).stdout

        assert wait_until(lambda: "TOK/S" in frame() and "tiny" in frame(), timeout=15), frame()
        screen = frame()
        assert "agents" in screen and "http:alice" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)

        def gone() -> bool:
            return subprocess.run(["tmux", "has-session", "-t", session],
                                  capture_output=True).returncode != 0

        assert wait_until(gone, timeout=10)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_top_shows_sandbox_tiers_and_memory_figures(web: KernelProcess) -> None:
    from tests.conftest import TEST_TIER, agent

    with web.connect() as conn:
        aid = conn.proc.spawn(agent("idle"), name="idler")
        conn.memory.add("a memory for top to count", namespace="user/top-test")
        try:
            assert wait_until(lambda: any(a.id == aid and a.state == "running"
                                          for a in conn.proc.ps()))
            out = web.cli("top", "--once", "--interval", "0.1")
        finally:
            conn.proc.kill(aid)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "idler" in line)
    assert TEST_TIER in row
    assert "memory resident" in out.stdout and "embedded" in out.stdout


def test_keys_are_never_wider_than_their_minter(web: KernelProcess) -> None:
    from tests.conftest import agent

    with web.connect() as conn:
        aid = conn.proc.spawn(agent("keymaker"), argv=["llm.chat@llm/tiny", "llm.*", "proc.spawn",
                                                       "nope.op"],
                              caps=["caps.delegate", "llm.chat@llm/tiny"])
        info = conn.proc.wait(aid, timeout=30)
    assert info.result == {"llm.chat@llm/tiny": "ok", "llm.*": "PermissionDenied",
                           "proc.spawn": "PermissionDenied", "nope.op": "InvalidArgument"}
    out = web.cli("token", "mint", "--cap", "nope.op")
    assert out.returncode == 1 and "no syscall" in out.stderr


def test_aios_sdk_memory_storage_and_tool_queries(web: KernelProcess) -> None:
    """AIOS's memory, storage and tool queries (the SDK's own query models) become memory.*,
    fs.* and tools.* syscalls in the key's own space: `mem/http/NAME`, `fs/agent/http:NAME`."""
    requests = pytest.importorskip("requests")
    pytest.importorskip("cerebrum")
    from cerebrum.client import Cerebrum
    from cerebrum.memory.communication import MemoryQuery
    from cerebrum.storage.communication import StorageQuery
    from cerebrum.tool.communication import ToolQuery

    token = mint(web, "memory.*@mem/http/mia", "fs.*@fs/agent/http:mia",
                 "tools.call@tool/calculator", name="mia")
    client = Cerebrum(base_url=f"{base_url(web)}/aios/{token}")

    def query(kind: str, data: Any) -> dict[str, Any]:
        data = data.model_dump() if hasattr(data, "model_dump") else data
        out = client._post("/query", {"query_type": kind, "agent_name": "x", "query_data": data})
        assert out["response"]["success"] is True and out["response"]["response_class"] == kind
        return out["response"]

    added = query("memory", MemoryQuery(operation_type="add_memory", messages=[
        {"content": "the cat sat on the mat", "metadata": {"topic": "cats"}}]))
    mid = added["memory_id"]
    got = query("memory", {"operation_type": "get_memory", "params": {"memory_id": mid}})
    assert got["content"] == "the cat sat on the mat" and got["metadata"] == {"topic": "cats"}
    query("memory", {"operation_type": "update_memory",
                     "params": {"memory_id": mid, "content": "the cat sat on the red mat"}})
    hits = query("memory", {"operation_type": "retrieve_memory",
                            "params": {"query": "red mat", "k": 3}})["search_results"]
    assert hits[0]["memory_id"] == mid and "red" in hits[0]["content"]
    with web.connect() as conn:  # the key's own namespace, not a user's or an agent's
        assert conn.memory.get(mid, namespace="http/mia").content.endswith("red mat")
    # Another key reaches neither mia's memories by name nor by id in its own namespace.
    other = Cerebrum(base_url=f"{base_url(web)}/aios/" + mint(
        web, "memory.*@mem/http/ned", name="ned"))
    for params, status in (({"memory_id": mid, "namespace": "http/mia"}, 403),
                           ({"memory_id": mid}, 404)):
        with pytest.raises(requests.HTTPError) as info:
            other._post("/query", {"query_type": "memory", "query_data": {
                "operation_type": "get_memory", "params": params}})
        assert info.value.response.status_code == status
    query("memory", {"operation_type": "remove_memory", "params": {"memory_id": mid}})

    def storage(op: str, **params: Any) -> Any:
        return query("storage", StorageQuery(operation_type=op, messages=[params]))[
            "response_message"]

    assert "mounted" in storage("mount", root_dir="root")
    storage("create_dir", dir_path="notes")
    storage("write", file_path="notes/plan.txt", content="first draft about llamas")
    storage("write", file_path="notes/plan.txt", content="second draft about alpacas")
    assert storage("read", file_path="notes/plan.txt") == "second draft about alpacas"
    assert [s["path"] for s in storage("list", dir_path="notes")] == ["notes/plan.txt"]
    assert "now version 3" in storage("rollback", file_path="notes/plan.txt", n=1)
    assert storage("read", file_path="notes/plan.txt") == "first draft about llamas"
    assert storage("retrieve", query_text="llamas", n=2)[0]["path"] == "notes/plan.txt"
    from sdk.tokens import parse_unverified
    from tests.conftest import agent

    with web.connect() as conn:  # sharing a folder with a running agent: a token for it
        aid = conn.proc.spawn(agent("idle"), name="reader")
        try:
            cap = parse_unverified(storage("share", file_path="notes", to="reader"))
        finally:
            conn.proc.kill(aid)
    assert cap.audiences == (f"agent:{aid}",) and "fs/agent/http:mia/notes" in str(cap.rule_sets)
    with pytest.raises(requests.HTTPError) as info:  # outside its own namespace
        client._post("/query", {"query_type": "storage", "query_data": {
            "operation_type": "read", "params": {"file_path": "../x"}}})
    assert info.value.response.status_code == 403

    out = query("tool", ToolQuery(tool_calls=[
        {"name": "calculator", "parameters": {"expression": "6 * 7"}}]))
    assert out["response_message"] == {"value": 42}
    out = query("tool", {"tool_calls": [  # arguments as a JSON string, as models write them
        {"name": "calculator", "parameters": '{"expression": "1 + 1"}'},
        {"name": "calculator", "parameters": {"expression": "1 / 0"}}]})
    assert out["response_message"][0] == {"value": 2}
    assert out["response_message"][1].startswith("error:")
    for data, status in (({"tool_calls": [{"name": "python", "parameters": {}}]}, 403),
                         ({"tool_calls": []}, 400),
                         ({"operation_type": "frobnicate", "params": {}}, 400),
                         ({"operation_type": "rollback",
                           "params": {"file_path": "notes/plan.txt", "n": "x"}}, 400),
                         ({"operation_type": "write", "params": {"file_path": 5}}, 400),
                         ({"operation_type": "rollback",
                           "params": {"file_path": "notes/plan.txt", "n": 99}}, 404)):
        with pytest.raises(requests.HTTPError) as info:
            client._post("/query", {"query_type": "tool" if "tool_calls" in data else "storage",
                                    "query_data": data})
        assert info.value.response.status_code == status, data


def test_openai_embeddings(web: KernelProcess) -> None:
    import numpy as np

    c = openai.OpenAI(base_url=base_url(web) + "/v1", max_retries=0,
                      api_key=mint(web, "memory.embed", name="emma"))
    texts = ["the cat sat", "the cat sat", "quantum chromodynamics"]
    got = c.embeddings.create(input=texts, model="text-embedding-3-small")  # base64 on the wire
    floats = c.embeddings.create(input=texts, model="x", encoding_format="float")
    assert got.model == "hash" and got.usage.prompt_tokens == 8
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (3, 384) and [d.index for d in got.data] == [0, 1, 2]
    assert np.allclose(vectors, [d.embedding for d in floats.data], atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.999 and vectors[0] @ vectors[2] < 0.5
    with web.connect() as conn:  # the same syscall from the SDK
        assert np.allclose(conn.memory.embed(["the cat sat"]).vectors[0], vectors[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(input="x", model="x", dimensions=10)
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=base_url(web) + "/v1", max_retries=0, api_key=mint(
            web, "llm.chat", name="finn")).embeddings.create(input="x", model="x")
