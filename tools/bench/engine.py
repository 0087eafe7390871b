"""Engine micro-benchmark: the llm.py agent workload driven straight into the engine.

    .venv/bin/python tools/bench/engine.py [--agents 16,64] [--turns 2] [--max-tokens 32]
                                           [--max-batch 64] [--dtype float32] [--profile]
                                           [--speculate 0,4] [--pack] [--lean] [--compile] [--int8]

No kernel, no processes, no scheduler policy: N closed-loop agents (shared system prompt, own
growing history, greedy) whose calls join the batch first come first served, up to
`--max-batch`, one `engine.step` per iteration. Prints aggregate tok/s (also per CPU-second of
the process: on a shared machine, with --threads 1, the steadier figure), p50 time to first token
and call latency, and where the step time went (forward passes by kind, sampling, the rest).
`--speculate` lists speculate_max_batch values to run each agent count with (0: off), A/B in
one process: the inter-token latency (p50 over calls of (call - TTFT) / (tokens - 1)), the
share of drafted tokens accepted, and whether the greedy texts equal the first value's.
The eager runs use the model as loaded, through transformers' forward; `--pack` runs every
configuration again with the linear layers packed for oneDNN, and `--lean` as the kernel runs
a Llama: projections fused, layers packed, the pass through lean.py. `--compile` runs them
again after compiling each decoder layer's MLP and norms with torch.compile (inductor,
dynamic shapes; attention stays eager, it is the ragged kernel), `--int8` with the linear
layers quantized to int8: each the same A/B against the eager runs (tokens per CPU-second,
inter-token latency, greedy texts equal), and the time each took to make.
For iterating on the engine; the end-to-end comparison with other systems is llm.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from workload import SYSTEM, user_turn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def prompt(tokenizer, history: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Timer:
    """Wraps the runner's forward to add up seconds by kind of pass (decode, prefill, mixed);
    a speculating row's verify chunk counts as decoding."""

    def __init__(self, runner) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        inner = runner.forward

        def forward(lo, decode_cols, decode_tokens, chunks):
            decode = len(decode_tokens) + sum(len(c.tokens) for c in chunks if c.verify)
            sizes = [len(c.tokens) for c in chunks if not c.verify]
            kind = "decode" if not sizes else "prefill" if not decode else "mixed"
            sizes = [decode, *sizes]
            t0 = time.perf_counter()
            out = inner(lo, decode_cols, decode_tokens, chunks)
            self.seconds[kind] += time.perf_counter() - t0
            self.calls[kind] += 1
            self.tokens[kind] += sum(sizes)
            return out

        runner.forward = forward


def run(engine, tokenizer, n: int, turns: int, max_tokens: int, max_batch: int) -> dict:
    from kernel.llm.engine import SamplingParams

    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(n)]
    turn = [0] * n
    texts: dict[tuple[int, int], str] = {}
    waiting: list[int] = []  # request ids, first come first served
    running: list[int] = []
    owner: dict[int, int] = {}
    arrival: dict[int, float] = {}
    first: dict[int, float] = {}
    reply: dict[int, list[int]] = {}
    ttfts, latencies, itls, tokens = [], [], [], 0
    ids = iter(range(10**9))

    def submit(agent: int, now: float) -> None:
        histories[agent].append({"role": "user", "content": user_turn(agent, turn[agent])})
        rid = next(ids)
        owner[rid], arrival[rid], reply[rid] = agent, now, []
        engine.add(rid, prompt(tokenizer, histories[agent]),
                   SamplingParams(temperature=0.0, max_tokens=max_tokens))
        waiting.append(rid)

    timer = Timer(engine.runner)
    step_time = 0.0
    start, cpu = time.perf_counter(), time.process_time()
    for agent in range(n):
        submit(agent, start)
    while waiting or running:
        while waiting and len(running) < max_batch:
            running.append(waiting.pop(0))
        t0 = time.perf_counter()
        outputs = engine.step(list(running))
        now = time.perf_counter()
        step_time += now - t0
        for rid, out in outputs.items():
            if out.new_tokens:
                first.setdefault(rid, now)
                reply[rid] += out.new_tokens
                tokens += len(out.new_tokens)
            if out.finished:
                running.remove(rid)
                agent = owner[rid]
                ttfts.append(first[rid] - arrival[rid])
                latencies.append(now - arrival[rid])
                if len(reply[rid]) > 1:
                    itls.append((now - first[rid]) / (len(reply[rid]) - 1))
                text = tokenizer.decode(reply[rid], skip_special_tokens=True)
                texts[(agent, turn[agent])] = text.strip()
                histories[agent].append({"role": "assistant", "content": text})
                turn[agent] += 1
                if turn[agent] < turns:
                    submit(agent, now)
    makespan = time.perf_counter() - start
    cpu = time.process_time() - cpu
    stats = engine.stats()
    forward = sum(timer.seconds.values())
    return {"n": n, "tok_s": tokens / makespan, "makespan": makespan, "cpu": cpu,
            "tok_cpu_s": tokens / cpu,
            "ttft": statistics.median(ttfts), "lat": statistics.median(latencies),
            "itl": statistics.median(itls) if itls else 0.0,
            "accept": stats["spec_accepted"] / max(1, stats["spec_drafted"]),
            "steps": stats["steps"], "forwards": stats["forwards"],
            "prefill": stats["prefill_tokens"], "hit": stats["prefix_hit_rate"],
            "split": {k: (timer.seconds[k], timer.calls[k], timer.tokens[k])
                      for k in sorted(timer.seconds)},
            "other": step_time - forward, "texts": texts}


def compile_blocks(model) -> None:
    """Compile each decoder layer's MLP and RMS norms in place (the work between attentions:
    matmuls and the elementwise ops inductor can fuse); compiling itself happens at the first
    call of each shape class, in `prepare`'s warm-up."""
    for layer in model.model.layers:
        for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
            getattr(layer, name).compile(dynamic=True)


def prepare(variant: str, model, tokenizer, args):
    """The model for a variant's runs, made and warmed (its compile or quantization time
    printed, not counted in the runs)."""
    import copy

    import torch

    from kernel.llm.engine import Engine

    t0 = time.perf_counter()
    if variant == "packed":
        from kernel.llm.engine.packed import pack_linears

        model = copy.deepcopy(model)
        what = f"{pack_linears(model)} linear layers packed for oneDNN"
    elif variant == "lean":
        from kernel.llm.engine.packed import fuse_projections, pack_linears

        model = copy.deepcopy(model)
        fused = fuse_projections(model)
        what = (f"{fused} projections fused, {pack_linears(model)} linear layers packed, the "
                f"lean pass (as the kernel runs it)")
    elif variant == "compiled":
        model = copy.deepcopy(model)
        compile_blocks(model)
        what = "mlp + norms compiled (inductor, dynamic shapes)"
    else:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                       dtype=torch.qint8)
        what = "linear layers int8 (dynamic quantization)"
    warm = Engine(model, tokenizer, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                  lean=variant == "lean")
    for agents in (1, 2):  # one decode token a pass; several (a compile's shape classes)
        run(warm, tokenizer, agents, 1, 4, args.max_batch)
    print(f"{what}: made and warmed in {time.perf_counter() - t0:.1f} s")
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", default="16,64")
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="print torch's op profile of a run")
    p.add_argument("--speculate", default="0",
                   help="speculate_max_batch values, each a run per agent count (0: off)")
    p.add_argument("--pack", action="store_true",
                   help="then every run again with the linear layers packed as the kernel "
                        "packs them (kernel/llm/engine/packed.py)")
    p.add_argument("--lean", action="store_true",
                   help="then every run again as the kernel runs a Llama: q/k/v and gate/up "
                        "fused, layers packed, the pass through kernel/llm/engine/lean.py")
    p.add_argument("--compile", action="store_true",
                   help="then every run again with the decoder layers' MLPs and norms compiled")
    p.add_argument("--int8", action="store_true",
                   help="then every run again with int8 linear layers (torch's dynamic "
                        "quantization: int8 weights, activations quantized per pass; float32)")
    args = p.parse_args()
    if args.int8 and args.dtype != "float32":  # before the eager runs, not after them
        p.error("--int8 quantizes float32 linear layers: use --dtype float32")

    import torch

    from kernel.llm.engine import Engine
    from kernel.llm.store import ModelStore

    torch.set_num_threads(args.threads)
    model, tokenizer = ModelStore().load("smollm2", dtype=args.dtype)
    print(f"dtype={args.dtype} threads={args.threads} max_batch={args.max_batch} "
          f"turns={args.turns} max_tokens={args.max_tokens}")
    print(f"{'agents':>6} {'spec':>4} {'tok/s':>7} {'tok/cpu-s':>9} {'makespan':>8} "
          f"{'ttft50':>7} {'itl50':>6} {'lat50':>6} {'accept':>6} {'steps':>5} {'fwds':>5} "
          f"{'prefill':>7} {'hit':>5}  time split (s / passes / tokens)")
    baseline: dict | None = None
    specs = [int(spec) for spec in args.speculate.split(",")]
    plain = [(int(n), spec) for n in args.agents.split(",") for spec in specs]
    variants = ["eager"] + [v for v, on in (("packed", args.pack), ("lean", args.lean),
                                            ("compiled", args.compile),
                                            ("int8", args.int8)) if on]
    eager: dict[tuple[int, int], dict] = {}
    models = {"eager": model}
    for variant, (n, spec) in ((v, r) for v in variants for r in plain):
        if variant not in models:
            models[variant] = prepare(variant, models["eager"], tokenizer, args)
        model = models[variant]
        engine = Engine(model, tokenizer, max_batch=args.max_batch,
                        prefill_chunk=args.prefill_chunk, speculate_max_batch=spec,
                        lean=variant == "lean")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                r = run(engine, tokenizer, n, args.turns, args.max_tokens, args.max_batch)
        else:
            r = run(engine, tokenizer, n, args.turns, args.max_tokens, args.max_batch)
        split = "  ".join(f"{k} {s:.1f}/{c}/{t}" for k, (s, c, t) in r["split"].items())
        tag = f"{spec}{variant[0]}" if variant != "eager" else str(spec)
        print(f"{n:>6} {tag:>4} {r['tok_s']:7.1f} {r['tok_cpu_s']:9.1f} {r['makespan']:7.1f}s "
              f"{r['ttft']:6.2f}s {1000 * r['itl']:4.0f}ms {r['lat']:5.2f}s {r['accept']:6.2f} "
              f"{r['steps']:>5} {r['forwards']:>5} {r['prefill']:>7} {r['hit']:5.2f}  {split}  "
              f"other {r['other']:.1f}")
        if args.profile:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if variant != "eager":
            before = eager[(n, spec)]
            same = sum(r["texts"].get(k) == v for k, v in before["texts"].items())
            print(f"       {variant} vs eager: {r['tok_cpu_s'] / before['tok_cpu_s']:.2f}x tok per "
                  f"CPU-s, {r['tok_s'] / before['tok_s']:.2f}x tok/s, itl "
                  f"{r['itl'] / max(before['itl'], 1e-9):.2f}x; greedy texts equal: "
                  f"{same}/{len(before['texts'])}")
            continue
        eager[(n, spec)] = r
        if baseline is None or (len(specs) > 1 and spec == specs[0]):
            baseline = r | {"spec": spec}  # with several values: each agent count's first
        else:
            same = sum(r["texts"].get(k) == v for k, v in baseline["texts"].items())
            print(f"       greedy texts equal to the {baseline['n']}-agent spec "
                  f"{baseline['spec']} run's, same agents: {same}/{len(baseline['texts'])}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
