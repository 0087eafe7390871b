"""The reference agents of userland/agents, end to end on real kernels: the tiny random model
for the mechanics that do not depend on what a model says, a scripted OpenAI-compatible model
where they do (a ReAct trace that calls tools; a worker whose model call hangs) or where a
kernel boots twice (the assistant's restart: no torch to import), and SmolLM2 (integration)
for the real thing."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from tests.conftest import ROOT, KernelProcess

AGENTS = ROOT / "userland" / "agents"
REACT_CAPS = ["llm.chat", "tools.call@tool/calculator"]
PLANNER_CAPS = ["llm.chat", "llm.models", "proc.spawn", "proc.info", "caps.delegate",
                "ipc.send@ipc/"]
STALL = "wait forever"  # a subtask whose model call the scripted server never answers


class Scripted(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible model that answers from the conversation it is sent: the ReAct
    agent gets a fixed trace (a tool that does not exist, a reply with no action, its file,
    its memory, the calculator, the answer), a planner's worker echoes its subtask, and the
    subtask STALL is held until the test releases it."""

    react = ["Thought: I will check the weather.\nAction: weather[Paris]",
             "I am not sure what to do.",
             "Thought: I will read my notes.\nAction: read_file[notes.txt]",
             "Thought: I will look in my memory.\nAction: search_memory[Ada]",
             "Thought: I will use the calculator.\nAction: calculator[6 * 7]",
             "Thought: The calculator says 42.\nAction: finish[42]"]
    stalled = threading.Event()
    release = threading.Event()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        last = messages[-1]["content"]
        if last == STALL:
            type(self).stalled.set()
            type(self).release.wait(120)
            text = "too late"
        elif messages[0]["content"].startswith("You solve tasks step by step"):
            task_at = max(i for i, m in enumerate(messages) if m["content"].startswith("Task:"))
            text = self.react[min((len(messages) - task_at) // 2, len(self.react) - 1)]
        else:
            text = f"done: {last}"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for chunk in ({"choices": [{"index": 0, "delta": {"content": text}}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 5}}):
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def scripted() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    Scripted.release.set()
    server.shutdown()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path,
           scripted: str) -> Iterator[KernelProcess]:
    """Serves the tiny model (the default) and the scripted one."""
    k = KernelProcess(tmp_path_factory.mktemp("ref") / "state")
    k.extra_args = ["--model", f"tiny={tiny_dir}", "--model", f"script={scripted}", "--preload"]
    k.start()
    yield k
    assert k.stop() == 0


def run(k: KernelProcess, name: str, argv: list[str], caps: list[str],
        agent: str | None = None, timeout: float = 180) -> sdk.AgentInfo:
    """Run userland/agents/`agent or name`.py as `name` with `argv`; its ended AgentInfo."""
    with k.connect(timeout=60) as admin:
        aid = admin.proc.spawn(str(AGENTS / f"{agent or name}.py"), name=name, argv=argv,
                               caps=caps)
        info = admin.proc.wait(aid, timeout=timeout)
        assert info.exit_status == 0, admin.proc.logs(aid, "stderr").data.decode()
        return info


# --- ReAct ------------------------------------------------------------------------------------

def test_react_runs_its_tools_and_feeds_back_bad_output(kernel: KernelProcess) -> None:
    with kernel.connect() as admin:
        admin.fs.write("notes.txt", "Ada's number is 6 * 7", owner="react-s")
        admin.memory.add("Ada likes the calculator", namespace="agent/react-s")
    out = run(kernel, "react-s", ["--model", "script", "--steps", "8", "What is 6 * 7?"],
              REACT_CAPS, agent="react").result
    assert out["answer"] == "42" and out["steps"] == 6
    seen = [step.get("observation", "") for step in out["trace"]]
    assert seen[0].startswith("error: there is no tool 'weather'")
    assert seen[1].startswith("error: no Action")
    assert seen[2] == "Ada's number is 6 * 7"  # its own file, through fs
    assert "Ada likes the calculator" in seen[3]  # its memory, searched
    assert seen[4] == "42"  # the kernel's calculator tool
    # The finished task is remembered for later searches.
    with kernel.connect() as admin:
        kept = admin.memory.list(namespace="agent/react-s", filter={"kind": "react"})
    assert [m.content for m in kept] == ["Task: What is 6 * 7?\nAnswer: 42"]


def test_react_reads_the_action_formats_small_models_write() -> None:
    from userland.agents.react import parse

    assert parse("Thought: add.\nAction: calculator[2 + 3]") == ("calculator", "2 + 3")
    assert parse("Action: Calculator(2 + 3)") == ("calculator", "2 + 3")
    assert parse("Action: read_file: 'notes.txt'") == ("read_file", "notes.txt")
    assert parse("Action: finish[x = [1, 2]]") == ("finish", "x = [1, 2]")
    assert parse("Thought: done.\nFinal Answer: 5") == ("finish", "5")
    assert parse("The answer is 5.") is None


def test_react_stops_at_its_step_limit(kernel: KernelProcess) -> None:
    out = run(kernel, "react-limit", ["--model", "script", "--steps", "3", "What is 6 * 7?"],
              REACT_CAPS, agent="react").result
    assert out["answer"] is None and out["steps"] == 3


def test_react_on_the_tiny_model_ends_within_its_step_limit(kernel: KernelProcess) -> None:
    """Random tokens: whatever they parse as, each step is an observation and the loop ends."""
    out = run(kernel, "react-tiny", ["--steps", "3", "--max-tokens", "12", "What is 2 + 3?"],
              REACT_CAPS, agent="react").result
    assert 1 <= out["steps"] <= 3
    assert all("observation" in step or step["action"][0] == "finish"
               for step in out["trace"])


# --- Reflexion --------------------------------------------------------------------------------

def test_reflexion_keeps_its_attempts_and_a_rerun_reads_them(kernel: KernelProcess) -> None:
    argv = ["--tries", "2", "--max-tokens", "8", "--expect", "no model says this",
            "What is 2 + 2?"]
    first = run(kernel, "reflexion", argv, ["llm.chat"]).result
    assert first["remembered"] == 0 and first["judge"] == "expect"
    assert [a["passed"] for a in first["attempts"]] == [False, False]
    assert all(a["lesson"] for a in first["attempts"])
    second = run(kernel, "reflexion", argv, ["llm.chat"]).result
    assert second["remembered"] == 2  # the first run's attempts, from its memory
    with kernel.connect() as admin:
        kept = admin.memory.list(namespace="agent/reflexion", filter={"kind": "reflexion"})
    assert len(kept) == 4
    assert {m.metadata["answer"] for m in kept[:2]} == {a["answer"] for a in first["attempts"]}


def test_reflexion_checks_answers_with_python_and_with_the_model(kernel: KernelProcess) -> None:
    caps = ["llm.chat", "tools.call@tool/python"]
    passing = run(kernel, "reflexion-py", ["--max-tokens", "8", "--check",
                                           "assert isinstance(answer, str)", "Say hi."],
                  caps, agent="reflexion").result
    assert passing["passed"] and len(passing["attempts"]) == 1
    assert passing["attempts"][0]["feedback"] == "the check passed"
    failing = run(kernel, "reflexion-py", ["--tries", "1", "--max-tokens", "8", "--check",
                                           "assert answer == 'never'", "Say hi."],
                  caps, agent="reflexion").result
    assert not failing["passed"] and "AssertionError" in failing["attempts"][0]["feedback"]
    critic = run(kernel, "reflexion-model", ["--tries", "2", "--max-tokens", "8", "Say hi."],
                 ["llm.chat"], agent="reflexion").result
    assert critic["judge"] == "model" and 1 <= len(critic["attempts"]) <= 2


# --- the planner ------------------------------------------------------------------------------

def test_planner_gathers_every_workers_answer(kernel: KernelProcess) -> None:
    out = run(kernel, "planner", ["--max-tokens", "8", "one | two | three"],
              PLANNER_CAPS).result
    assert out["model"] == "tiny" and out["failed"] == 0
    assert [w["subtask"] for w in out["workers"]] == ["one", "two", "three"]
    assert all(isinstance(w["answer"], str) for w in out["workers"])
    assert isinstance(out["answer"], str)
    names = [w["worker"] for w in out["workers"]]
    assert len(set(names)) == 3 and all(n.startswith("planner-") for n in names)
    with kernel.connect() as admin:
        workers = [admin.proc.info(w["id"]) for w in out["workers"]]
        audit = admin.audit.read(limit=10000)
    assert all(w.state == "exited" and w.exit_status == 0 for w in workers)
    # Each worker was granted nothing at spawn; its rights came as one delegated token.
    grants = [r for r in audit if r.event == "delegate"
              and r.detail.get("to") in {f"agent:{w.id}" for w in workers}]
    assert len(grants) == 3
    for r in grants:
        assert r.detail["rules"] == ["llm.chat@llm/tiny", "ipc.send@ipc/planner"]
        assert r.detail["budgets"] == {"llm_tokens": 8}


def _running(admin: sdk.Connection, prefix: str, suffix: str) -> sdk.AgentInfo:
    return next(a for a in admin.proc.ps() if a.state == "running"
                and a.name.startswith(prefix) and a.name.endswith(suffix))


def test_planner_reports_a_killed_worker_and_keeps_the_others(kernel: KernelProcess) -> None:
    Scripted.stalled.clear()
    with kernel.connect(timeout=60) as admin:
        start = time.monotonic()
        pid = admin.proc.spawn(str(AGENTS / "planner.py"), name="planner-k", caps=PLANNER_CAPS,
                               argv=["--model", "script", "--deadline", "60",
                                     f"one | {STALL} | three"])
        assert Scripted.stalled.wait(60)  # worker 2 is in the middle of its model call
        admin.proc.kill(_running(admin, "planner-k-", "-2").id, grace=0)
        info = admin.proc.wait(pid, timeout=60)
        elapsed = time.monotonic() - start
    assert info.exit_status == 0
    out = info.result
    dead = out["workers"][1]
    assert dead["error"] == "ECANCELED" and dead["worker"].endswith("-2")
    assert "killed" in dead["message"]
    assert [w.get("answer") for w in out["workers"][::2]] == ["done: one", "done: three"]
    assert out["failed"] == 1 and out["answer"]
    assert elapsed < 45  # seen dead, not waited out to the 60 s deadline


def test_planner_reports_a_worker_that_never_answers_at_its_deadline(
        kernel: KernelProcess) -> None:
    with kernel.connect(timeout=60) as admin:
        start = time.monotonic()
        pid = admin.proc.spawn(str(AGENTS / "planner.py"), name="planner-h", caps=PLANNER_CAPS,
                               argv=["--model", "script", "--deadline", "4",
                                     f"one | two | {STALL}"])
        info = admin.proc.wait(pid, timeout=60)
        elapsed = time.monotonic() - start
        out = info.result
        hung = out["workers"][2]
        assert hung["error"] == "ETIMEDOUT" and hung["worker"].endswith("-3")
        assert [w.get("answer") for w in out["workers"][:2]] == ["done: one", "done: two"]
        assert 4 <= elapsed < 40
        # Nothing is left behind: the stuck worker's own call times out and it exits.
        assert admin.proc.wait(hung["id"], timeout=60).state == "exited"


# --- the assistant ----------------------------------------------------------------------------

def test_assistant_remembers_across_a_kernel_restart(fresh_kernel: KernelProcess,
                                                     scripted: str) -> None:
    # What it remembers does not depend on what the model says: the scripted model answers
    # at once and needs no torch in either kernel (the README's tour runs it on a local one).
    fresh_kernel.extra_args = ["--model", f"script={scripted}"]
    fresh_kernel.start()
    argv = ["--max-tokens", "8"]
    first = run(fresh_kernel, "assistant", [*argv, "My name is Ada."], ["llm.chat"]).result
    assert first["remembered"] == 0 and first["turns"] == 1
    assert fresh_kernel.stop() == 0
    fresh_kernel.start()
    second = run(fresh_kernel, "assistant", [*argv, "What is my name?"], ["llm.chat"]).result
    assert second["remembered"] == 2 and second["turns"] == 2
    assert second["sent"] == 4  # the system prompt, both remembered turns, the question
    # A window of one message: the rest is recalled by searching its memory.
    third = run(fresh_kernel, "assistant", [*argv, "--window", "1", "What is my name?"],
                ["llm.chat"]).result
    assert third["remembered"] == 4 and third["recalled"] >= 1
    history = run(fresh_kernel, "assistant", [], ["llm.chat"]).result["history"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    assert history[0]["content"] == "My name is Ada."


# --- SmolLM2 ----------------------------------------------------------------------------------

@pytest.mark.integration
def test_react_on_smollm2_ends_cleanly(smollm2_kernel: KernelProcess) -> None:
    out = run(smollm2_kernel, "react", ["What is 17 * 23?"], REACT_CAPS, timeout=600).result
    print(json.dumps(out, indent=1))  # what SmolLM2 did (pytest -s shows it)
    assert 1 <= out["steps"] <= 6
    for step in out["trace"]:  # every step but a finish got an observation
        assert "observation" in step or step["action"][0] == "finish"
        if step["action"] == ["calculator", "17 * 23"]:
            assert step["observation"] == "391"
