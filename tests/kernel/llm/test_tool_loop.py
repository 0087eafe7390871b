"""The tool-calling loop: a scripted model (deterministic), the tiny model, and SmolLM2."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from sdk.tools import run_tools
from tests.conftest import KernelProcess, agent

LOOP_CAPS = ["llm.chat", "tools.list", "tools.call@tool/calculator", "tools.call@tool/time"]


def _call(name: str, arguments: str, i: int) -> dict:
    return {"index": i, "id": f"c{i}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ScriptedModel(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that plays a fixed conversation, one reply per request."""

    script = [
        # 1: arguments that do not fit the schema, and a tool that does not exist
        {"tool_calls": [_call("calculator", '{"expr": "6*7"}', 0),
                        _call("weather", '{"city": "Paris"}', 1)]},
        # 2: a call in text that does not parse
        {"content": '{"tool_calls": [{"name": "calculator", "arguments": {"expression": '},
        # 3: two good calls at once, and one whose arguments are not JSON
        {"tool_calls": [_call("calculator", '{"expression": "6*7"}', 0),
                        _call("time", '{"timezone": "UTC"}', 1),
                        _call("calculator", "{expression: 1}", 2)]},
        # 4: the answer
        {"content": "The answer is 42."},
    ]
    seen: list[dict] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        step = self.script[min(len(self.seen), len(self.script)) - 1]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        delta = ({"content": step["content"]} if "content" in step
                 else {"tool_calls": step["tool_calls"]})
        chunks = [{"choices": [{"index": 0, "delta": delta}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason":
                                "tool_calls" if "tool_calls" in step else "stop"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 5}}]
        for chunk in chunks:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


def _boot(state: Path, *flags: str) -> KernelProcess:
    k = KernelProcess(state)
    k.extra_args = list(flags)
    return k.start()


def _loop(k: KernelProcess, task: str) -> dict:
    with k.connect(timeout=60) as conn:
        aid = conn.proc.spawn(agent("looper"), argv=[task], caps=LOOP_CAPS)
        info = conn.proc.wait(aid, timeout=120)
        assert info.exit_status == 0, conn.proc.logs(aid, stream="stderr").data.decode()
        return info.result


def test_scripted_model_loop_feeds_back_errors_and_results(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    k = _boot(tmp_path / "state", "--model", f"script=http://127.0.0.1:{server.server_address[1]}/v1")
    try:
        out = _loop(k, "6 48 What is 6 times 7?")
    finally:
        server.shutdown()
        assert k.stop() == 0
    assert out["answer"] == "The answer is 42." and out["steps"] == 4
    assert out["calls"] == 3  # the ones that reached the kernel: 1 in step 1, 2 in step 3
    errors = "\n".join(out["errors"])
    assert "'expression' is a required property" in errors  # the kernel's EINVAL, fed back
    assert "no tool 'weather'" in errors
    assert "could not be parsed" in errors
    assert "arguments are not valid JSON" in errors
    # What the model was sent on its last turn: every call answered, in order, by id.
    last = ScriptedModel.seen[3]["messages"]
    tool_msgs = [m for m in last if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["c0", "c1", "c0", "c1", "c2"]
    assert json.loads(tool_msgs[2]["content"]) == {"value": 42}
    assert json.loads(tool_msgs[3]["content"])["timezone"] == "UTC"
    assert tool_msgs[4]["content"].startswith("error: arguments are not valid JSON")
    assert [t["function"]["name"] for t in ScriptedModel.seen[0]["tools"]] == ["calculator",
                                                                               "time"]
    assert any(m.get("tool_calls") for m in last if m["role"] == "assistant")


@pytest.fixture(scope="module")
def tiny_kernel(tmp_path_factory: pytest.TempPathFactory,
                tiny_dir: Path) -> Iterator[KernelProcess]:
    k = _boot(tmp_path_factory.mktemp("loop") / "state", "--model", f"tiny={tiny_dir}",
              "--preload")
    yield k
    assert k.stop() == 0


def test_tiny_model_loop_is_deterministic_and_never_crashes(tiny_kernel: KernelProcess) -> None:
    first = _loop(tiny_kernel, "2 12 What is 6 times 7?")  # from an agent process
    with tiny_kernel.connect(timeout=60) as conn:
        second = run_tools(conn, [{"role": "user", "content": "What is 6 times 7?"}],
                                     ["calculator", "time"], max_steps=2, max_tokens=12)
    # Greedy: the same conversation, step for step, whoever runs the loop: every turn's role,
    # everything the model said (text and calls), what was fed back as errors.
    def turns(messages: list) -> list:
        return [(m["role"], m.get("content") if m["role"] != "tool" else m.get("tool_call_id"),
                 m.get("tool_calls")) for m in messages]

    assert turns(first["messages"]) == turns(msgspec.to_builtins(second.messages))
    assert (first["answer"], first["steps"], first["calls"], first["errors"]) == (
        second.answer, second.steps, second.tool_calls, second.errors)
    assert first["messages"][0] == {"role": "user", "content": "What is 6 times 7?"}
    assert sum(m["role"] == "assistant" for m in first["messages"]) == first["steps"]
    assert 1 <= first["steps"] <= 2
    assert first["answer"] is not None or first["steps"] == 2


def test_run_tools_refuses_unknown_kernel_tools(tiny_kernel: KernelProcess) -> None:
    with tiny_kernel.connect() as conn, pytest.raises(ValueError, match="no tool 'nope'"):
        run_tools(conn, [{"role": "user", "content": "hi"}], ["nope"])


@pytest.mark.integration
def test_smollm2_uses_the_calculator(smollm2_kernel: KernelProcess) -> None:
    out = _loop(smollm2_kernel, "4 64 Use the calculator tool to compute 123 * 456.")
    assert 1 <= out["steps"] <= 4  # whatever a 135M model does, the loop ends cleanly
    if out["calls"]:
        results = [m["content"] for m in out["messages"] if m["role"] == "tool"]
        assert any("56088" in r for r in results) or out["errors"]
