"""float32 against bfloat16 on the LLM benchmark's prompts: greedy agreement and speed.

    .venv/bin/python tools/bench/dtype.py [--prompts 32] [--turns 1] [--max-tokens 64]
                                          [--threads 2] [--single 4]

SmolLM2 from the model store, once per dtype, each in an engine of its own (no kernel): the
benchmark's agents' prompts (tools/bench/workload.py: shared system prompt, agent i's question)
run greedy as one batch in each dtype, then `--single` of them one at a time (the latency a lone
agent sees). A later turn's history holds the float32 reply, so both dtypes always get the same
prompts. Prints tok/s and tok per CPU-second of each dtype (with --threads 1 on a shared
machine, the second is the steadier), how many outputs are identical token for token, the mean
common prefix in tokens, and a last RESULT line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from workload import SYSTEM, user_turn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def prompt(tokenizer, history: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def generate(engine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], dict]:
    """Every prompt greedy, all in one batch: the tokens of each, and the timings."""
    from kernel.llm.engine import SamplingParams

    out: list[list[int]] = [[] for _ in prompts]
    for i, ids in enumerate(prompts):
        engine.add(i, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    running = list(range(len(prompts)))
    wall, cpu = time.perf_counter(), time.process_time()
    while running:
        for i, step in engine.step(running).items():
            out[i] += step.new_tokens
            if step.finished:
                running.remove(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return out, {"tokens": sum(map(len, out)), "wall": wall, "cpu": cpu}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=32, help="agents, one prompt each per turn")
    p.add_argument("--turns", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--single", type=int, default=4,
                   help="of the first turn's prompts, this many also one at a time (batch 1)")
    args = p.parse_args()

    import torch

    from kernel.llm.engine import Engine
    from kernel.llm.store import ModelStore, cpu_runs_bf16

    torch.set_num_threads(args.threads)
    dtypes = ("float32", "bfloat16")
    engines, tokenizer = {}, None
    for dtype in dtypes:
        model, tokenizer = ModelStore().load("smollm2", dtype=dtype)
        engines[dtype] = Engine(model, tokenizer, max_batch=max(64, args.prompts))
    print(f"threads={args.threads} prompts={args.prompts} turns={args.turns} "
          f"max_tokens={args.max_tokens} cpu_runs_bf16={cpu_runs_bf16()} "
          f"capability={torch.backends.cpu.get_cpu_capability()}")
    warm = [prompt(tokenizer, [{"role": "user", "content": "hello"}])]
    for engine in engines.values():
        generate(engine, warm, 4)  # first-call costs (oneDNN kernels, allocations) out

    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(args.prompts)]
    outputs: dict[str, list[list[int]]] = {d: [] for d in dtypes}
    batched = {d: {"tokens": 0, "wall": 0.0, "cpu": 0.0} for d in dtypes}
    for turn in range(args.turns):
        for i, history in enumerate(histories):
            history.append({"role": "user", "content": user_turn(i, turn)})
        prompts = [prompt(tokenizer, h) for h in histories]
        for dtype in dtypes:
            out, timing = generate(engines[dtype], prompts, args.max_tokens)
            outputs[dtype] += out
            for key, value in timing.items():
                batched[dtype][key] += value
        for history, reply in zip(histories, outputs["float32"][-args.prompts:], strict=True):
            history.append({"role": "assistant",
                            "content": tokenizer.decode(reply, skip_special_tokens=True)})

    single = {d: {"tokens": 0, "wall": 0.0, "cpu": 0.0} for d in dtypes}
    alone = [prompt(tokenizer, [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": user_turn(i, 0)}])
             for i in range(min(args.single, args.prompts))]
    for ids in alone:
        for dtype in dtypes:
            _, timing = generate(engines[dtype], [ids], args.max_tokens)
            for key, value in timing.items():
                single[dtype][key] += value

    pairs = list(zip(outputs["float32"], outputs["bfloat16"], strict=True))
    same = sum(a == b for a, b in pairs)
    prefixes = [common_prefix(a, b) for a, b in pairs]
    lengths = [len(a) for a, _ in pairs]
    print(f"\n{'dtype':<9} {'batch':>5} {'tokens':>6} {'tok/s':>7} {'tok/cpu-s':>9}")
    rate, per_cpu = {}, {}
    for label, table, batch in (("batched", batched, args.prompts), ("single", single, 1)):
        for dtype in dtypes:
            t = table[dtype]
            if not t["tokens"]:
                continue
            rate[label, dtype] = t["tokens"] / t["wall"]
            per_cpu[label, dtype] = t["tokens"] / t["cpu"]
            print(f"{dtype:<9} {batch:>5} {t['tokens']:>6} {rate[label, dtype]:7.1f} "
                  f"{per_cpu[label, dtype]:9.1f}")
    print()
    for turn in range(args.turns):
        part = pairs[turn * args.prompts:(turn + 1) * args.prompts]
        print(f"turn {turn + 1}: identical {sum(a == b for a, b in part)}/{len(part)}, common "
              f"prefix mean {statistics.mean(common_prefix(a, b) for a, b in part):.1f} tokens")
    print(f"greedy outputs identical fp32 vs bf16: {same}/{len(pairs)} "
          f"({100 * same / len(pairs):.0f}%); common prefix mean {statistics.mean(prefixes):.1f}"
          f" of {statistics.mean(lengths):.1f} fp32 tokens, median {statistics.median(prefixes)}")
    line = (f"RESULT identical={100 * same / len(pairs):.0f}% "
            f"common_prefix_mean={statistics.mean(prefixes):.1f} "
            f"fp32_tok_s={rate['batched', 'float32']:.1f} "
            f"bf16_tok_s={rate['batched', 'bfloat16']:.1f} "
            f"speedup_bf16={rate['batched', 'bfloat16'] / rate['batched', 'float32']:.2f} "
            # per CPU-second: the steadier figure on a shared machine
            f"speedup_bf16_cpu="
            f"{per_cpu['batched', 'bfloat16'] / per_cpu['batched', 'float32']:.2f}")
    if ("single", "float32") in rate:
        line += (f" single_fp32_tok_s={rate['single', 'float32']:.1f}"
                 f" single_bf16_tok_s={rate['single', 'bfloat16']:.1f}")
    print(line)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
