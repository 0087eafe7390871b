"""The LLM core through the whole path: SDK → kernel → scheduler → engine → SDK, on a tiny
random model (and SmolLM2 when it is cached), plus a remote OpenAI-compatible backend."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from kernel.llm.chat import parse_reply
from tests.conftest import KernelProcess, agent, wait_until

HELLO = [{"role": "user", "content": "hello there"}]



def _boot(state: Path, *flags: str, env: dict[str, str] | None = None) -> KernelProcess:
    k = KernelProcess(state, env)
    k.extra_args = list(flags)
    return k.start()


@pytest.fixture(scope="module")
def llm_kernel(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[KernelProcess]:
    k = _boot(tmp_path_factory.mktemp("llm") / "state", "--model", f"tiny={tiny_dir}",
              "--preload")
    yield k
    assert k.stop() == 0


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[KernelProcess]:
    """One kernel for the tests of per-model limits: the tiny model under four names, each
    with the one setting its test is about (the limits are per model, so none sees another's):
    `quota` a lifetime token budget, `tight` a KV budget that forces preemption, `capped` two
    calls in flight per agent, `refusing` a chat template that raises. One boot, not four."""
    import shutil

    tmp = tmp_path_factory.mktemp("limited")
    refusing = tmp / "refusing"
    shutil.copytree(tiny_dir, refusing)
    template = refusing / "chat_template.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == m['content'] %}"
                        "{{ raise_exception('roles are not content') }}{% endif %}{% endfor %}"
                        + template.read_text())
    config = tmp / "kernel.toml"
    config.write_text(f'[models.quota]\nsource = "{tiny_dir}"\nagent_max_tokens = 40\n'
                      f'[models.tight]\nsource = "{tiny_dir}"\nkv_budget_mb = 0.1\n'
                      'prefill_chunk = 16\n'
                      f'[models.capped]\nsource = "{tiny_dir}"\nagent_max_concurrent = 2\n'
                      f'[models.refusing]\nsource = "{refusing}"\n')
    k = _boot(tmp / "state", "--config", str(config), "--preload")
    yield k
    assert k.stop() == 0


def test_models_lists_the_served_model(llm_kernel: KernelProcess) -> None:
    with llm_kernel.connect() as conn:
        (info,) = conn.llm.models()
        assert info.name == "tiny" and info.backend == "local" and info.default
        # Once loaded (--preload), in what KernelProcess pins; from a directory, not the store.
        assert wait_until(lambda: conn.llm.models()[0].running_dtype is not None, timeout=60)
        (info,) = conn.llm.models()
    assert (info.dtype, info.running_dtype, info.stored) == ("float32", "float32", None)


def test_greedy_chat_equals_plain_generate(llm_kernel: KernelProcess, tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = tok.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with llm_kernel.connect() as conn:
        result = conn.llm.chat(HELLO, max_tokens=16)
    assert result.message.content == expected
    assert result.usage.prompt_tokens == ids.shape[1]
    assert result.usage.completion_tokens == out.shape[1] - ids.shape[1]


def test_stream_deltas_make_up_the_result(llm_kernel: KernelProcess) -> None:
    with llm_kernel.connect() as conn:
        stream = conn.llm.stream(HELLO, max_tokens=20, temperature=0.8, seed=7)
        text = "".join(d.text for d in stream)
        again = conn.llm.chat(HELLO, max_tokens=20, temperature=0.8, seed=7)
    assert stream.result.message.content == text == again.message.content
    assert stream.result.usage.cached_tokens > 0 or again.usage.cached_tokens > 0


@pytest.mark.parametrize("seed", range(6))
def test_json_mode_parses_or_says_it_was_cut(llm_kernel: KernelProcess, seed: int) -> None:
    with llm_kernel.connect() as conn:
        result = conn.llm.chat(HELLO, max_tokens=12 + seed * 7, temperature=1.0, seed=seed,
                               json=True)
    text = result.message.content
    if result.finish_reason == "length":  # an unfinished object is never marked complete
        assert result.usage.completion_tokens == 12 + seed * 7 and text.startswith("{")
    else:
        assert result.finish_reason == "stop" and isinstance(json.loads(text), dict)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                          "age": {"type": "integer", "minimum": 0,
                                                  "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}


def test_sdk_enforces_schemas_tool_calls_regex_and_choice(llm_kernel: KernelProcess) -> None:
    import jsonschema

    with llm_kernel.connect() as conn:
        for seed in range(3):
            r = conn.llm.chat(HELLO, json_schema=PERSON, temperature=1.0, seed=seed,
                              max_tokens=80)
            assert r.finish_reason == "stop"
            jsonschema.validate(json.loads(r.message.content), PERSON)
        streamed = conn.llm.stream(HELLO, json_schema=PERSON, max_tokens=80)
        jsonschema.validate(json.loads("".join(d.text for d in streamed)), PERSON)
        for choice in ("required", "add", {"type": "function", "function": {"name": "add"}}):
            r = conn.llm.chat(HELLO, tools=[ADD, {"type": "function", "function": {
                "name": "other"}}] if choice != "required" else [ADD], tool_choice=choice,
                parallel_tool_calls=False, max_tokens=120)
            (call,) = r.message.tool_calls
            assert r.finish_reason == "tool_calls" and call.function.name == "add"
            jsonschema.validate(json.loads(call.function.arguments),
                                ADD["function"]["parameters"])
        assert conn.llm.chat(HELLO, regex="[a-c]{2}-[0-9]", max_tokens=9).message.content[2] == "-"
        assert conn.llm.chat(HELLO, choice=["up", "down"], temperature=1.0,
                             seed=1).message.content in ("up", "down")
        cut = conn.llm.chat(HELLO, json_schema=PERSON, max_tokens=3)
        assert cut.finish_reason == "length" and cut.message.content.startswith("{")


def test_unenforceable_structures_are_einval_and_harm_no_neighbour(
        llm_kernel: KernelProcess) -> None:
    hostile = [{"json_schema": {"type": "string", "pattern": "(("}},
               {"json_schema": {"$ref": "#/$defs/missing"}},
               {"json_schema": {"enum": ["x" * 1000] * 300}},
               {"regex": "a+", "choice": ["a"]},
               {"tools": [{"function": {"name": "bad name"}}], "tool_choice": "required"}]
    with llm_kernel.connect() as neighbour, llm_kernel.connect() as conn:
        before = neighbour.llm.chat(HELLO, max_tokens=8).message.content
        for fields in hostile:
            # (the 300 KB schema is refused by size first: it counts as prompt text)
            with pytest.raises(sdk.InvalidArgument, match=r"cannot enforce|prompt too long"):
                conn.llm.chat(HELLO, max_tokens=8, **fields)
        assert neighbour.llm.chat(HELLO, max_tokens=8).message.content == before


def test_cancelled_stream_frees_its_call(llm_kernel: KernelProcess) -> None:
    async def main() -> None:
        async with sdk.connect_async(state_dir=llm_kernel.state_dir) as conn:
            stream = await conn.llm.stream(HELLO, max_tokens=2000)
            async for _ in stream:
                break  # leaving early sends llm.cancel
            assert await conn.sys.null() is None

    asyncio.run(main())
    with llm_kernel.connect() as conn:
        assert wait_until(lambda: conn.sys.stats().calls_parked == 0)
        with pytest.raises(sdk.NotFound):
            conn.llm.cancel(10**6)


def test_unknown_model_is_enoent(llm_kernel: KernelProcess) -> None:
    with llm_kernel.connect() as conn, pytest.raises(sdk.NotFound):
        conn.llm.chat(HELLO, model="nope")


def test_agents_need_a_capability_for_the_model(llm_kernel: KernelProcess) -> None:
    with llm_kernel.connect() as conn:
        denied = conn.proc.spawn(agent("chatter"), name="nocap")
        allowed = [conn.proc.spawn(agent("chatter"), name=f"chat{i}",
                                   caps=["llm.chat@llm/tiny"]) for i in range(4)]
        assert conn.proc.wait(denied, timeout=60).result == "EPERM"
        replies = [conn.proc.wait(a, timeout=120).result for a in allowed]
        alone = conn.llm.chat(HELLO, max_tokens=16).message.content
    assert replies == [alone] * 4  # batched with each other, same greedy tokens as alone


def test_ended_agents_leave_no_scheduler_state(llm_kernel: KernelProcess) -> None:
    """Each agent that used a model leaves accounting in its scheduler (the fair policy's
    counter); once the agent is over for good the kernel has the scheduler forget it, so that
    state is bounded by the agents alive, while a principal still alive keeps its own."""
    with llm_kernel.connect() as conn:
        conn.llm.chat(HELLO, max_tokens=1)  # this user stays: its counter must stay too
        ids = [conn.proc.spawn(agent("chatter"), name=f"ender{i}", caps=["llm.chat@llm/tiny"])
               for i in range(3)]
        assert all(conn.proc.wait(i, timeout=120).result for i in ids)

        def tracked() -> float | None:
            return conn.sys.stats().models["tiny"].get("sched_agents")

        assert wait_until(lambda: tracked() == 1, timeout=30), tracked()


def test_missing_model_names_the_pull_command(tmp_path: Path) -> None:
    k = _boot(tmp_path / "state", env={"AGENTOS_MODEL_DIR": str(tmp_path / "empty")})
    try:
        with k.connect() as conn, pytest.raises(sdk.NotFound, match="agentos model pull"):
            conn.llm.chat(HELLO)
    finally:
        assert k.stop() == 0


def test_token_budget_is_equota(limited: KernelProcess) -> None:
    with limited.connect() as conn:
        conn.llm.chat(HELLO, model="quota", max_tokens=4)
        with pytest.raises(sdk.QuotaExceeded):
            for _ in range(5):
                conn.llm.chat(HELLO, model="quota", max_tokens=4)


def test_tool_call_parsing_is_robust() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    ok = parse_reply('Sure! {"tool_calls": [{"name": "add", "arguments": {"a": 1}}]} done', tools)
    assert ok.tool_calls and ok.tool_calls[0].function.name == "add"
    assert json.loads(ok.tool_calls[0].function.arguments) == {"a": 1}
    bare = parse_reply('{"name": "add", "arguments": "{\\"a\\": 2}"}', tools)
    assert bare.tool_calls and json.loads(bare.tool_calls[0].function.arguments) == {"a": 2}
    wrong = parse_reply('{"tool_calls": [{"name": "rm", "arguments": {}}]}', tools)
    assert wrong.tool_calls is None and "unknown tool 'rm'" in (wrong.error or "")
    broken = parse_reply('{"tool_calls": [{"name": "add", "arguments": {', tools)
    assert broken.tool_calls is None and broken.content


class _OpenAIStub(http.server.BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible server: streams the words of a fixed reply as SSE."""

    reply = "hello from the remote model"
    seen: list[dict] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i, word in enumerate(self.reply.split(" ")):
            chunk = {"choices": [{"index": 0, "delta": {"content": (" " if i else "") + word}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5}}
        self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


def test_remote_openai_backend(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    k = _boot(tmp_path / "state", "--model", f"far={url}")
    try:
        with k.connect() as conn:
            result = conn.llm.chat(HELLO, max_tokens=9, temperature=0.5, seed=3)
            stream = conn.llm.stream(HELLO)
            pieces = [d.text for d in stream]
        assert result.message.content == _OpenAIStub.reply == "".join(pieces)
        assert result.usage.completion_tokens == 5 and len(pieces) == 5
        sent = _OpenAIStub.seen[0]
        assert sent["model"] == "far" and sent["max_tokens"] == 9 and sent["seed"] == 3
        assert sent["stream"] is True
        # A remote model's context is unknown: 16 bytes per token of an assumed 32768 tokens.
        with k.connect() as conn, pytest.raises(sdk.InvalidArgument, match="max_prompt_bytes"):
            conn.llm.chat([{"role": "user", "content": "x" * 1000000}])
        assert len(_OpenAIStub.seen) == 2  # never sent on
    finally:
        server.shutdown()
        assert k.stop() == 0


class _RefusingStub(_OpenAIStub):
    """A server that refuses every request as vLLM refuses a schema it cannot compile."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        self.send_error(400, "invalid grammar")


def test_remote_models_get_the_structure_and_refusals_are_einval(tmp_path: Path) -> None:
    from kernel.llm.remote import RemoteModel
    from sdk import abi

    args = abi.ChatArgs(messages=[abi.ChatMessage(role="user", content="x")],
                        json_schema=PERSON, tools=[ADD], tool_choice="required",
                        parallel_tool_calls=False)
    body = RemoteModel("http://x/v1", "m").body(args)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": PERSON, "strict": True}}
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    body = RemoteModel("http://x/v1", "m").body(abi.ChatArgs(
        messages=args.messages, regex="a+"))
    assert body["guided_regex"] == "a+" and "response_format" not in body
    _RefusingStub.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    k = _boot(tmp_path / "state", "--model", f"far=http://127.0.0.1:{server.server_address[1]}/v1")
    try:
        with k.connect() as conn, pytest.raises(sdk.InvalidArgument, match="400"):
            conn.llm.chat(HELLO, choice=["a", "b"])
        assert _RefusingStub.seen[0]["guided_choice"] == ["a", "b"]
    finally:
        server.shutdown()
        assert k.stop() == 0


@pytest.mark.integration
def test_smollm2_end_to_end(smollm2_kernel: KernelProcess) -> None:
    with smollm2_kernel.connect(timeout=120) as conn:
        result = conn.llm.chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=24)
        as_json = conn.llm.chat([{"role": "user", "content": "Give the capital of France."}],
                                max_tokens=40, json=True)
    assert "4" in result.message.content
    assert isinstance(json.loads(as_json.message.content), dict)


@pytest.mark.integration
def test_smollm2_structured_output_and_forced_tool_calls(smollm2_kernel: KernelProcess) -> None:
    """SmolLM2 alone rarely calls a tool or fits a schema (tools/bench/structured.py); under
    the grammar it always does, through the SDK and through LangChain at the door."""
    import jsonschema
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, ConfigDict

    k = smollm2_kernel
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False}}}
    city = {"type": "object", "properties": {"name": {"type": "string"},
                                             "country": {"type": "string"}},
            "required": ["name", "country"], "additionalProperties": False}
    with k.connect(timeout=120) as conn:
        r = conn.llm.chat([{"role": "user", "content": "What's the weather in Paris?"}],
                          tools=[weather], tool_choice="required", max_tokens=64)
        (call,) = r.message.tool_calls
        assert json.loads(call.function.arguments)["city"]
        r = conn.llm.chat([{"role": "user", "content": "Name the capital of Italy and "
                            "its country, as JSON."}], json_schema=city, max_tokens=64)
        jsonschema.validate(json.loads(r.message.content), city)
    out = k.cli("token", "mint", "--for", "http:lc", "--cap", "llm.*")
    url = f"http://{(k.state_dir / 'run' / 'http').read_text().strip()}/v1"

    class City(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        country: str

    llm = ChatOpenAI(base_url=url, api_key=out.stdout.strip(), model="smollm2",
                     temperature=0, max_tokens=64, max_retries=0)
    for method in ("function_calling", "json_schema"):
        got = llm.with_structured_output(City, method=method).invoke(
            "Name the capital of France and its country.")
        assert isinstance(got, City) and got.name, method



def test_memory_pressure_preempts_by_recompute_and_keeps_outputs(
        limited: KernelProcess) -> None:
    questions = [[{"role": "user", "content": f"question {i} " + "padding " * 40}]
                 for i in range(6)]

    async def together() -> list[str]:
        async with sdk.connect_async(state_dir=limited.state_dir) as conn:
            replies = await asyncio.gather(*(conn.llm.chat(q, model="tight", max_tokens=60)
                                             for q in questions))
        return [r.message.content for r in replies]

    batched = asyncio.run(together())
    with limited.connect() as conn:
        stats = conn.sys.stats().models["tight"]
        alone = [conn.llm.chat(q, model="tight", max_tokens=60).message.content
                 for q in questions]
    assert stats["memory_preemptions"] > 0 and stats["batch_capacity"] >= 1
    assert batched == alone


def test_agent_streams_arrive_through_its_completion_ring(llm_kernel: KernelProcess) -> None:
    with llm_kernel.connect() as conn:
        before = conn.sys.stats().syscalls.get("ring.entries", 0)
        agent_id = conn.proc.spawn(agent("ringstream"), caps=["llm.chat"])
        info = conn.proc.wait(agent_id, timeout=60)
        after = conn.sys.stats().syscalls.get("ring.entries", 0)
        assert wait_until(lambda: conn.sys.stats().calls_parked == 0)
    result = info.result
    assert info.exit_status == 0 and result["rings"] and result["deltas"] > 1
    assert result["joined"] == result["result"] == result["again"]
    assert after - before >= 5  # two streams, the cancel, a chat, proc.exit
def test_llm_token_budget_counts_generated_tokens(llm_kernel: KernelProcess) -> None:
    """A token's `llm_tokens` budget (access manager): reserved at admission, settled to the
    tokens generated, never exceeded."""
    with llm_kernel.connect() as admin:
        me = admin.caps.inspect().subject
        grant = admin.caps.delegate(me, ["llm.chat"], budgets={"llm_tokens": 40})
        generated = 0
        with sdk.connect(token=grant.token, state_dir=llm_kernel.state_dir) as conn:
            while True:
                try:
                    reply = conn.llm.chat(HELLO, max_tokens=12)
                except sdk.QuotaExceeded:
                    break
                generated += reply.usage.completion_tokens
                assert admin.caps.inspect(grant.token).budgets["llm_tokens"] == [generated, 40]
        assert 40 - 12 < generated <= 40


def _peak_rss_mb(k: KernelProcess) -> float:
    assert k.proc is not None
    with open(f"/proc/{k.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def test_huge_prompts_are_refused_fast_and_never_hold_a_neighbour(tmp_path: Path,
                                                                   tiny_dir: Path) -> None:
    """Issue 15: hostile agents send prompts of MBs (refused by bytes at admission) and prompts
    just under the byte cap but far over the context (tokenized off the worker, refused by
    tokens) while a neighbour keeps chatting. Before the fix the worker tokenized each whole
    prompt itself: the neighbour waited ~10 s and the kernel grew by ~0.7 GB."""
    k = _boot(tmp_path / "state", "--model", f"tiny={tiny_dir}", "--preload")
    short = [{"role": "user", "content": "Say hi"}]
    try:
        with k.connect(timeout=120) as conn:
            conn.llm.chat(short, max_tokens=4)
            before = _peak_rss_mb(k)
            hostile = [conn.proc.spawn(agent("bigprompt"), name=f"big{i}", argv=[task],
                                       caps=["llm.chat"])
                       for i, task in enumerate(["2 3000000", "2 3000000", "8 60000"])]
            waits = []
            while len(waits) < 20 or any(a.id in hostile and a.state in ("starting", "running")
                                         for a in conn.proc.ps()):
                started = time.monotonic()
                conn.llm.chat(short, max_tokens=4)
                waits.append(time.monotonic() - started)
                assert len(waits) < 2000
            results = [conn.proc.wait(a, timeout=60) for a in hostile]
        grown = _peak_rss_mb(k) - before
    finally:
        assert k.stop() == 0
    for info in results:
        assert info.exit_status == 0 and info.result, info
        for code, seconds in info.result:
            assert code == "EINVAL" and seconds < 5, info.result
    # Measured here: the neighbour's longest wait 0.1-0.3 s (old code: 9-10 s), peak RSS
    # +20 MB (old code: +700 MB). Generous bounds for a loaded machine.
    assert max(waits) < 3, sorted(waits)[-5:]
    assert grown < 250, grown


def test_concurrent_calls_per_agent_are_capped_before_queueing(limited: KernelProcess) -> None:
    from sdk import abi

    k = limited
    # Generations that cannot end early: all of a burst's are in flight together.
    long = abi.ChatArgs(messages=[abi.ChatMessage("user", "hello there")], model="capped",
                        max_tokens=16, ignore_eos=True)

    async def burst(n: int) -> list[str]:
        async with sdk.connect_async(state_dir=k.state_dir) as conn:
            async def one() -> str:
                try:
                    await conn.call("llm.chat", long, abi.ChatResult, wait_forever=True)
                    return "ok"
                except sdk.SyscallError as exc:
                    return exc.code.name
            return sorted(await asyncio.gather(*(one() for _ in range(n))))

    assert asyncio.run(burst(5)) == ["EAGAIN"] * 3 + ["ok"] * 2
    assert asyncio.run(burst(2)) == ["ok"] * 2  # the count went back down
    with k.connect() as conn:  # streams cancelled early release their places too
        for _ in range(3):
            stream = conn.stream("llm.chat", abi.ChatArgs(
                messages=long.messages, model="capped", max_tokens=16, ignore_eos=True,
                stream=True), abi.ChatDelta, abi.ChatResult)
            next(iter(stream))
            stream.close()
    assert asyncio.run(burst(2)) == ["ok"] * 2


def test_prompt_bytes_counts_every_text_and_stops_past_the_limit() -> None:
    import msgspec

    from kernel.llm.prompt import prompt_bytes
    from sdk import abi

    args = msgspec.convert({"messages": [
        {"role": "user", "content": "héllo", "name": "ab"},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                      "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "東京"}],
        "tools": [{"type": "function", "function": {"name": "f"}}]}, abi.ChatArgs)
    tools = len(msgspec.json.encode(args.tools))
    assert prompt_bytes(args, 10**6) == 6 + 2 + 1 + 2 + 1 + 6 + tools
    huge = abi.ChatArgs(messages=[abi.ChatMessage("user", "é" * 1000)] * 50)
    assert 100 < prompt_bytes(huge, 100) <= 100 + 2000  # stopped at the first message over


def test_a_template_that_refuses_the_messages_is_einval(limited: KernelProcess) -> None:
    """Chat templates raise on conversations they do not accept (roles out of order...); that
    used to be an exception on the worker thread, which ended it and hung every later call."""
    with limited.connect() as conn:
        with pytest.raises(sdk.InvalidArgument, match="roles are not content"):
            conn.llm.chat([{"role": "user", "content": "user"}], model="refusing")
        assert conn.llm.chat(HELLO, model="refusing", max_tokens=4).usage.completion_tokens >= 1
