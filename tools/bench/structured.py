"""Structured output with SmolLM2: how often it parses, what the grammar costs.

    .venv/bin/python tools/bench/structured.py [--threads 2] [--agents 1,64] [--tokens 48]
                                               [--rounds 4] [--max-tokens 96]

1. Parse rate on a fixed set of 50 prompts (25 tool calls over 4 tools, `tool_choice="required"`;
   25 extractions into 5 JSON Schemas), generated greedily with and without the grammar. A tool
   prompt parses when the reply holds a call to a known tool whose arguments validate against
   its schema (the kernel's lenient parser, kernel/llm/chat.py); an extraction parses when the
   first JSON object in the reply validates against its schema (jsonschema).
2. Throughput at 1 and 64 agents, constrained against unconstrained: every agent generates
   `--tokens` tokens (EOS ignored) of a JSON object whose schema cannot close that soon (an
   array of at least 1000 items, each {"name": string, "qty": integer}), so both runs do the
   same work and the constrained one does it under a mask at every token. The rounds alternate
   and the medians are compared. Two figures: decode tok/s measured end to end, and the
   grammar's own work (the time in the sampler, where masks are filled and applied, and in
   each token's emit, where matchers advance: the only places a constraint acts; the forward
   pass is identical) as a share of an unconstrained decode step. On this shared 2-core
   machine the neighbours' load moves the first by more than the difference between modes;
   the second is what the RESULT reports as overhead_pct, with the first beside it.
3. Grammar compile time per schema (the 25 tool sets and schemas above), cold (a fresh cache)
   and cached, and the once-per-model vocabulary build.

No kernel: the engine is driven directly, as tools/bench/engine.py does. The machine is
shared: the load average is printed with the figures. Last line:
`RESULT parse_rate=<constrained> parse_rate_free=<unconstrained> overhead_pct_64=<the grammar's
share of a step at the largest N> overhead_pct_1=<at 1> e2e_overhead_pct_64=… e2e_overhead_pct_1=…`
(e2e: decode tok/s lost, measured end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdk import abi  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string"}, "subject": {"type": "string"},
            "body": {"type": "string"}},
            "required": ["to", "subject", "body"], "additionalProperties": False}}},
]

TOOL_PROMPTS = [
    "What's the weather like in Paris right now, in celsius?",
    "Tell me the temperature in New York in fahrenheit.",
    "Is it raining in London? Use celsius.",
    "How hot is it in Cairo today (fahrenheit)?",
    "Weather in Tokyo please, celsius.",
    "What is 17 plus 25?",
    "Add 3.5 and 4.25.",
    "Compute 1200 + 345.",
    "What do you get when you add 99 and 1?",
    "Sum 0.1 and 0.2 for me.",
    "Search the web for the tallest building in the world.",
    "Look up recent news about the Mars rover.",
    "Find a recipe for banana bread online.",
    "Search for the population of Canada.",
    "Who won the 2018 football world cup? Search the web.",
    "Email alice@example.com with subject 'Lunch' saying I'll be late.",
    "Send bob@example.com an email titled 'Report' with body 'Attached is the report.'",
    "Write to carol@example.com, subject 'Hello', body 'How are you?'",
    "Email the team at team@example.com: subject 'Standup', body 'Moved to 10am'.",
    "Send an email to dave@example.com about the party, body 'See you Friday'.",
    "Should I take an umbrella in Berlin? Check the weather in celsius.",
    "Add 250 and 750, please.",
    "Search the web for the boiling point of water at altitude.",
    "Let eve@example.com know by email (subject 'Keys') that the keys are on the desk.",
    "What's the weather in Sydney in fahrenheit?",
]

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"], "additionalProperties": False},
    "city": {"type": "object", "properties": {
        "name": {"type": "string"}, "country": {"type": "string"},
        "population": {"type": "integer", "minimum": 0}},
        "required": ["name", "country", "population"], "additionalProperties": False},
    "product": {"type": "object", "properties": {
        "name": {"type": "string"}, "price": {"type": "number", "minimum": 0},
        "in_stock": {"type": "boolean"}},
        "required": ["name", "price", "in_stock"], "additionalProperties": False},
    "event": {"type": "object", "properties": {
        "title": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "attendees": {"type": "integer", "minimum": 0}},
        "required": ["title", "date", "attendees"], "additionalProperties": False},
    "book": {"type": "object", "properties": {
        "title": {"type": "string"}, "author": {"type": "string"},
        "year": {"type": "integer", "minimum": 0, "maximum": 2100}},
        "required": ["title", "author", "year"], "additionalProperties": False},
}

EXTRACTIONS = [
    ("person", "Maria Lopez is a 34-year-old engineer from Madrid."),
    ("person", "The youngest player, Tom Berg, is only 17."),
    ("person", "Grandpa Joe turned 88 last week."),
    ("person", "Aiko Tanaka, aged 29, joined the team in May."),
    ("person", "At 52, Peter Novak ran his first marathon."),
    ("city", "Lyon, in France, has about 520000 inhabitants."),
    ("city", "Osaka is a Japanese city of 2.7 million people (2700000)."),
    ("city", "Around 1400000 people live in Munich, Germany."),
    ("city", "Toronto, Canada: population 2794356."),
    ("city", "The Kenyan capital Nairobi has 4397073 residents."),
    ("product", "The UltraBlend 3000 blender costs $89.99 and is in stock."),
    ("product", "Sold out: the TrailRunner shoes at 120 dollars."),
    ("product", "Get the Aurora desk lamp for $24.50 - available now."),
    ("product", "The Nimbus umbrella (15 USD) is currently out of stock."),
    ("product", "In stock: a cast-iron skillet for 39.95."),
    ("event", "The Spring Gala on 2025-04-12 expects 300 guests."),
    ("event", "Python meetup, 2024-11-05, 45 people signed up."),
    ("event", "The board meeting is on 2025-01-20 with 8 attendees."),
    ("event", "Hackathon 2024-09-14: 120 participants registered."),
    ("event", "Our wedding is on 2026-06-06 and 150 guests are coming."),
    ("book", "'Dune' by Frank Herbert was published in 1965."),
    ("book", "George Orwell wrote '1984' in 1949."),
    ("book", "'Beloved', Toni Morrison, 1987."),
    ("book", "The Hobbit (J. R. R. Tolkien, 1937) is a classic."),
    ("book", "In 2003 Dan Brown published 'The Da Vinci Code'."),
]

# Throughput: an object whose array cannot close within --tokens tokens.
ITEMS = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1000,
         "items": {"type": "object", "properties": {"name": {"type": "string"},
                                                    "qty": {"type": "integer"}},
                   "required": ["name", "qty"], "additionalProperties": False}}},
         "required": ["items"], "additionalProperties": False}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def tool_args(prompt: str, max_tokens: int) -> abi.ChatArgs:
    return abi.ChatArgs(messages=[abi.ChatMessage(role="user", content=prompt)], tools=TOOLS,
                        tool_choice="required", max_tokens=max_tokens,
                        parallel_tool_calls=False)


def schema_args(kind: str, text: str, max_tokens: int) -> abi.ChatArgs:
    keys = ", ".join(SCHEMAS[kind]["properties"])
    prompt = (f"Extract the {kind} from this text as a JSON object with the keys {keys}. "
              f"Reply with only the JSON.\n\n{text}")
    return abi.ChatArgs(messages=[abi.ChatMessage(role="user", content=prompt)],
                        json_schema=SCHEMAS[kind], max_tokens=max_tokens)


class Probe:
    """Seconds spent where a constraint acts: the sampler (masks filled and applied) and each
    token's emit (the matcher advances); the forward pass is the same either way."""

    def __init__(self, engine: Any) -> None:
        import kernel.llm.engine.engine as engine_module

        self.seconds = 0.0
        sample, emit = engine_module.sample, engine._emit

        def timed_sample(*a: Any) -> list[int]:
            t0 = time.perf_counter()
            try:
                return sample(*a)
            finally:
                self.seconds += time.perf_counter() - t0

        def timed_emit(*a: Any) -> None:
            t0 = time.perf_counter()
            try:
                emit(*a)
            finally:
                self.seconds += time.perf_counter() - t0

        engine_module.sample, engine._emit = timed_sample, timed_emit


def generate(engine: Any, tokenizer: Any, grammars: Any, requests: list[abi.ChatArgs],
             constrained: bool, probe: Probe, ignore_eos: bool = False
             ) -> tuple[list[str], list[str | None], dict[str, float]]:
    """Run `requests` together to the end: their texts, finish reasons and timings."""
    from kernel.llm.chat import render
    from kernel.llm.grammar import sampling_params

    for i, args in enumerate(requests):
        params = sampling_params(args, grammars.matcher(args) if constrained else None)
        params.ignore_eos = ignore_eos
        engine.add(i, render(tokenizer, args), params)
    texts = [""] * len(requests)
    reasons: list[str | None] = [None] * len(requests)
    started_rows = [False] * len(requests)
    live = set(range(len(requests)))
    started, cpu, probe.seconds = time.perf_counter(), time.process_time(), 0.0
    decode_s = decode_tokens = tokens = steps = decode_steps = 0
    while live:
        decoding = all(started_rows[i] for i in live)  # no prompt left to prefill
        t0 = time.perf_counter()
        outputs = engine.step(sorted(live))
        dt = time.perf_counter() - t0
        new = sum(len(o.new_tokens) for o in outputs.values())
        tokens += new
        steps += 1
        if decoding:
            decode_s += dt
            decode_tokens += new
            decode_steps += 1
        for i, o in outputs.items():
            started_rows[i] = started_rows[i] or bool(o.new_tokens)
            texts[i] += o.text_delta
            if o.finished:
                reasons[i] = o.finish_reason
                live.discard(i)
    wall = time.perf_counter() - started
    return texts, reasons, {
        "tok_s": tokens / wall, "decode_tok_s": decode_tokens / max(decode_s, 1e-9),
        "cpu_tok_s": tokens / max(time.process_time() - cpu, 1e-9),
        "step_ms": 1000 * decode_s / max(1, decode_steps),
        "touched_ms": 1000 * probe.seconds / max(1, steps)}


def tool_parses(text: str) -> bool:
    import jsonschema

    from kernel.llm.chat import parse_reply

    calls = parse_reply(text, TOOLS).tool_calls or []
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    try:
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    except jsonschema.ValidationError:
        return False
    return bool(calls)


def schema_parses(text: str, kind: str) -> bool:
    import jsonschema

    from kernel.llm.chat import _json_objects

    objects = _json_objects(text)
    if not objects:
        return False
    try:
        jsonschema.validate(objects[0], SCHEMAS[kind])
    except jsonschema.ValidationError:
        return False
    return True


def parse_rates(engine: Any, tokenizer: Any, grammars: Any, max_tokens: int, probe: Probe
                ) -> dict[str, Any]:
    requests = ([tool_args(p, max_tokens) for p in TOOL_PROMPTS]
                + [schema_args(k, t, max_tokens) for k, t in EXTRACTIONS])
    out = {}
    for constrained in (False, True):
        texts, reasons, _ = generate(engine, tokenizer, grammars, requests, constrained, probe)
        tools = [tool_parses(t) for t in texts[:len(TOOL_PROMPTS)]]
        schemas = [schema_parses(t, k) for t, (k, _) in zip(texts[len(TOOL_PROMPTS):],
                                                             EXTRACTIONS, strict=True)]
        out[constrained] = {"tools": sum(tools) / len(tools),
                            "schemas": sum(schemas) / len(schemas),
                            "all": (sum(tools) + sum(schemas)) / len(texts),
                            "cut": sum(r == "length" for r in reasons),
                            "examples": (texts[0], texts[len(TOOL_PROMPTS)])}
    return out


def throughput(engine: Any, tokenizer: Any, grammars: Any, n: int, tokens: int, rounds: int,
               probe: Probe) -> dict[bool, dict[str, float]]:
    requests = [abi.ChatArgs(messages=[abi.ChatMessage(
        role="user", content=f"List the items in warehouse {i} as JSON.")], json_schema=ITEMS,
        max_tokens=tokens) for i in range(n)]
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    generate(engine, tokenizer, grammars, requests, True, probe, ignore_eos=True)  # warm up
    for r in range(rounds):  # alternate which mode goes first, too
        for constrained in ((False, True) if r % 2 == 0 else (True, False)):
            *_, figures = generate(engine, tokenizer, grammars, requests, constrained, probe,
                                   ignore_eos=True)
            runs[constrained].append(figures)
    return {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for c, rs in runs.items()}


def compile_times(tokenizer: Any) -> dict[str, float]:
    from kernel.llm.grammar import Grammars

    grammars = Grammars(tokenizer)
    t0 = time.perf_counter()
    grammars.tokenizer()
    vocab_s = time.perf_counter() - t0
    requests = ([tool_args(p, 64) for p in TOOL_PROMPTS[:1]]
                + [abi.ChatArgs(messages=[abi.ChatMessage(role="user", content="x")],
                                tools=[tool], tool_choice="required") for tool in TOOLS]
                + [abi.ChatArgs(messages=[abi.ChatMessage(role="user", content="x")],
                                json_schema=s) for s in (*SCHEMAS.values(), ITEMS)])
    cold, cached = [], []
    for args in requests:
        t0 = time.perf_counter()
        grammars.matcher(args)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        grammars.matcher(args)
        cached.append(time.perf_counter() - t0)
    return {"vocab_s": vocab_s, "n": len(requests),
            "cold_p50_ms": 1000 * statistics.median(cold), "cold_max_ms": 1000 * max(cold),
            "cached_p50_us": 1e6 * statistics.median(cached), "cached_max_us": 1e6 * max(cached)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--agents", default="1,64")
    p.add_argument("--tokens", type=int, default=48, help="tokens per agent, throughput runs")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96, help="per reply, parse-rate runs")
    args = p.parse_args()

    import torch

    from kernel.llm.engine import Engine
    from kernel.llm.grammar import Grammars
    from kernel.llm.store import ModelStore

    torch.set_num_threads(args.threads)
    model, tokenizer = ModelStore().load("smollm2", dtype="float32")
    sizes = [int(n) for n in args.agents.split(",")]
    engine = Engine(model, tokenizer, max_batch=max(64, *sizes))
    probe = Probe(engine)
    print(f"SmolLM2-135M fp32, {args.threads} threads, load {load()}")

    c = compile_times(tokenizer)
    print(f"\ncompile ({c['n']} grammars: tool sets and schemas): vocabulary once per model "
          f"{c['vocab_s']:.2f} s; cold p50 {c['cold_p50_ms']:.2f} ms, max "
          f"{c['cold_max_ms']:.2f} ms; cached p50 {c['cached_p50_us']:.0f} us, max "
          f"{c['cached_max_us']:.0f} us")

    grammars = Grammars(tokenizer)
    rates = parse_rates(engine, tokenizer, grammars, args.max_tokens, probe)
    print(f"\nparse rate, 50 prompts (greedy, max_tokens {args.max_tokens}), load {load()}")
    print(f"{'':14}{'tool calls':>12}{'schemas':>10}{'all':>8}")
    for constrained, name in ((False, "unconstrained"), (True, "constrained")):
        r = rates[constrained]
        print(f"{name:14}{r['tools']:>12.0%}{r['schemas']:>10.0%}{r['all']:>8.0%}"
              f"   ({r['cut']} cut by max_tokens)")
    for constrained, name in ((False, "unconstrained"), (True, "constrained")):
        tool_text, schema_text = rates[constrained]["examples"]
        print(f"  e.g. {name}: {tool_text[:110]!r}\n{'':9}{schema_text[:110]!r}")

    overhead, e2e = {}, {}
    print(f"\nthroughput, {args.tokens} tokens per agent (EOS ignored), median of "
          f"{args.rounds} alternating rounds")
    print(f"{'agents':>6} {'mode':<14}{'tok/s':>8}{'decode tok/s':>14}{'tok/CPU-s':>11}"
          f"{'step ms':>9}{'sample+emit ms/step':>21}")
    for n in sizes:
        figures = throughput(engine, tokenizer, grammars, n, args.tokens, args.rounds, probe)
        for constrained, name in ((False, "unconstrained"), (True, "constrained")):
            f = figures[constrained]
            print(f"{n:>6} {name:<14}{f['tok_s']:>8.1f}{f['decode_tok_s']:>14.1f}"
                  f"{f['cpu_tok_s']:>11.1f}{f['step_ms']:>9.1f}{f['touched_ms']:>21.2f}")
        free, bound = figures[False], figures[True]
        # The constraint's own work per step, against an unconstrained decode step: robust to
        # the neighbours' load, which moves whole-run figures by more than the difference.
        overhead[n] = 100 * (bound["touched_ms"] - free["touched_ms"]) / free["step_ms"]
        e2e[n] = 100 * (free["decode_tok_s"] - bound["decode_tok_s"]) / free["decode_tok_s"]
        whole = 100 * (free["tok_s"] - bound["tok_s"]) / free["tok_s"]
        print(f"{'':7}overhead: the grammar's work {overhead[n]:.1f}% of a step; measured "
              f"decode tok/s {e2e[n]:.1f}%, whole run {whole:.1f}% (load {load()})")
    big, one = max(sizes), min(sizes)
    print(f"RESULT parse_rate={rates[True]['all']:.2f} parse_rate_free={rates[False]['all']:.2f} "
          f"overhead_pct_64={overhead[big]:.1f} overhead_pct_1={overhead[one]:.1f} "
          f"e2e_overhead_pct_64={e2e[big]:.1f} e2e_overhead_pct_1={e2e[one]:.1f}")


if __name__ == "__main__":
    main()
