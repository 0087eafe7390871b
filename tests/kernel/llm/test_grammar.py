"""Grammar-constrained decoding (kernel/llm/grammar.py) on the tiny random model: whatever
JSON Schema Hypothesis draws, every output validates; forced and required tool choice always
yield calls whose arguments validate; masks survive preemption and prefix reuse; bad and
hostile grammars fail their own request only."""

from __future__ import annotations

import functools
import json
import string
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.llm.chat import parse_reply, render
from kernel.llm.engine import Engine, SamplingParams
from kernel.llm.grammar import GrammarError, Grammars, check, grammar_for, sampling_params
from sdk import abi
from tests.conftest import DEEP
from tests.tinymodel import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
HELLO = [abi.ChatMessage(role="user", content="hello there")]


@functools.cache
def shared() -> tuple[Engine, Grammars]:
    """One engine and one grammar cache for the module (Hypothesis reuses them)."""
    return Engine(tiny_model(), TOK, max_batch=16, prefix_cache_tokens=4096), Grammars(TOK)


def run(requests: dict[int, abi.ChatArgs], engine: Engine | None = None,
        grammars: Grammars | None = None) -> dict[int, tuple[str, str | None, list[int]]]:
    """Generate every request to its end, batched: {id: (text, finish_reason, tokens)}."""
    e, g = shared() if engine is None else (engine, grammars or shared()[1])
    for i, args in requests.items():
        e.add(i, render(TOK, args), sampling_params(args, g.matcher(args)))
    out: dict[int, tuple[str, str | None, list[int]]] = {i: ("", None, []) for i in requests}
    live = set(requests)
    while live:
        for i, o in e.step(sorted(live)).items():
            text, _, tokens = out[i]
            out[i] = (text + o.text_delta, o.finish_reason, tokens + o.new_tokens)
            if o.finished:
                live.discard(i)
    return out


# --- JSON Schemas whose instances are finite, drawn by Hypothesis ------------------------------

NAMES = st.text(string.ascii_lowercase, min_size=1, max_size=5)
PATTERNS = ["^[a-z]{1,4}$", "^[0-9]{2}-[A-Z]$", "^(yes|no)$", "^[A-Fa-f0-9]{3}$"]


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    bounds = st.integers(-1000, 1000)
    integers = st.tuples(bounds, st.integers(0, 500)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]})
    numbers = st.tuples(bounds, st.integers(1, 500)).map(
        lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]})
    strings = st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n})
    patterns = st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p})
    enums = st.lists(st.one_of(st.integers(-5, 5), NAMES), min_size=1, max_size=4,
                     unique=True).map(lambda v: {"enum": v})
    return st.one_of(integers, numbers, strings, patterns, enums,
                     st.just({"type": "boolean"}), st.just({"type": "null"}))


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))


def _containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    arrays = st.tuples(children, st.integers(0, 1), st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})
    return arrays | _objects(children)


SCHEMAS = st.recursive(_leaf(), _containers, max_leaves=6)
# Drawn as objects, not filtered out of containers: a filter rejecting half the draws, three
# times over in a list, failed Hypothesis's filter_too_much health check now and then.
OBJECTS = _objects(SCHEMAS)


@settings(max_examples=10 * DEEP, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEMAS, st.integers(0, 2**32), st.sampled_from([0.0, 1.0]))
def test_every_output_validates_against_the_drawn_schema(schema: dict[str, Any], seed: int,
                                                         temperature: float) -> None:
    args = abi.ChatArgs(messages=HELLO, json_schema=schema, temperature=temperature, seed=seed,
                        max_tokens=400)
    ((text, reason, _),) = run({0: args}).values()
    assert reason == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema)


# --- tool calls -------------------------------------------------------------------------------


def _tools(params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": p}}
            for i, p in enumerate(params)]


def _validate_calls(text: str, tools: list[dict[str, Any]]) -> list[abi.ToolCall]:
    calls = parse_reply(text, tools).tool_calls
    assert calls, text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return calls


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OBJECTS, min_size=1, max_size=3), st.integers(0, 2**32))
def test_required_tool_choice_always_yields_calls_that_validate(
        params: list[dict[str, Any]], seed: int) -> None:
    tools = _tools(params)
    args = abi.ChatArgs(messages=HELLO, tools=tools, tool_choice="required", temperature=1.0,
                        seed=seed, max_tokens=300, parallel_tool_calls=False)
    ((text, reason, _),) = run({0: args}).values()
    assert reason == "stop", text
    assert len(_validate_calls(text, tools)) == 1


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_decides_whether_a_second_call_may_follow(parallel: bool) -> None:
    tools = _tools([{"type": "object", "properties": {"a": {"type": "integer"}},
                     "required": ["a"], "additionalProperties": False}])
    args = abi.ChatArgs(messages=HELLO, tools=tools, tool_choice="required",
                        parallel_tool_calls=parallel)
    one = '{"tool_calls": [{"name": "tool_0", "arguments": {"a": 1}}'
    for text, ok in ((one + "]}", True), (one + ', {"name": "tool_0", "arguments": {"a": 2}}]}',
                                          parallel)):
        m = Grammars(TOK).matcher(args)
        assert m is not None
        accepted = True
        for token in TOK.encode(text, add_special_tokens=False):
            m.advance(token)
            accepted = accepted and m.error is None
        assert accepted == ok and (m.complete or not ok), text


def test_a_named_tool_is_the_one_called() -> None:
    """The doors and the SDK turn a named tool_choice into "required" over that tool alone."""
    from sdk.llm import _tool_choice

    tools = _tools([{"type": "object", "properties": {"a": {"type": "integer"}},
                     "required": ["a"], "additionalProperties": False},
                    {"type": "object", "properties": {}, "additionalProperties": False}])
    for name in ("tool_0", "tool_1"):
        listed, choice = _tool_choice(tools, {"type": "function", "function": {"name": name}})
        args = abi.ChatArgs(messages=HELLO, tools=listed, tool_choice=choice, max_tokens=200,
                            parallel_tool_calls=False)
        ((text, reason, _),) = run({0: args}).values()
        (call,) = _validate_calls(text, listed)
        assert reason == "stop" and call.function.name == name
    with pytest.raises(ValueError, match="not in tools"):
        _tool_choice(tools, "nope")


def test_auto_tool_choice_is_text_or_a_whole_call() -> None:
    tools = _tools([{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                            "maximum": 9}},
                     "required": ["a"], "additionalProperties": False}])
    outcomes = set()
    for seed in range(12):
        args = abi.ChatArgs(messages=HELLO, tools=tools, tool_choice="auto", temperature=1.0,
                            seed=seed, max_tokens=24)
        ((text, reason, _),) = run({0: args}).values()
        if text.startswith("{"):  # once it opens a brace, only a whole call can follow
            if reason == "stop":
                _validate_calls(text, tools)
            outcomes.add("call")
        else:
            outcomes.add("text")
    assert "text" in outcomes  # the random model mostly does not start with "{"


def test_max_tokens_inside_a_structure_is_length_not_stop() -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 50}},
              "required": ["s"], "additionalProperties": False}
    args = abi.ChatArgs(messages=HELLO, json_schema=schema, max_tokens=4, temperature=1.0,
                        seed=3)
    ((text, reason, tokens),) = run({0: args}).values()
    assert reason == "length" and len(tokens) == 4 and text.startswith('{"s"')


# --- the engine: masks with preemption, prefix reuse and failure ------------------------------


@pytest.mark.parametrize("keep_kv", [True, False])
def test_preempted_constrained_sequence_resumes_token_for_token(keep_kv: bool) -> None:
    schema = {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 6}
    args = {i: abi.ChatArgs(messages=HELLO, json_schema=schema, temperature=1.0, seed=i,
                            max_tokens=60) for i in range(3)}
    alone = run(args, Engine(tiny_model(), TOK, max_batch=4), Grammars(TOK))
    e, g = Engine(tiny_model(), TOK, max_batch=4), Grammars(TOK)
    for i, a in args.items():
        e.add(i, render(TOK, a), sampling_params(a, g.matcher(a)))
    got = {i: [] for i in args}
    live, step = set(args), 0
    while live:
        step += 1
        if step % 3 == 0:  # switch every sequence out and back in, often
            for i in live:
                e.preempt(i, keep_kv=keep_kv)
        for i, o in e.step(sorted(live)).items():
            got[i] += o.new_tokens
            if o.finished:
                live.discard(i)
    assert got == {i: tokens for i, (_, _, tokens) in alone.items()}
    assert e.stats()["preemptions"] > 0


def test_prefix_reuse_leaves_the_mask_alone() -> None:
    e = Engine(tiny_model(), TOK, max_batch=4, prefix_cache_tokens=4096)
    args = abi.ChatArgs(messages=HELLO, json_schema={"enum": ["alpha", "beta", 7]},
                        max_tokens=20)
    first = run({0: args}, e, Grammars(TOK))[0]
    second = run({1: args}, e, Grammars(TOK))[1]
    assert first == second and first[1] == "stop" and json.loads(first[0]) in ("alpha", "beta", 7)
    assert e.stats()["prefix_tokens_reused"] > 0


class FailsAfter:
    """A constraint whose grammar breaks after `n` tokens (as a limit being hit would)."""

    def __init__(self, n: int) -> None:
        self.vocab, self.n, self.seen = len(TOK), n, 0

    complete = False

    @property
    def error(self) -> str | None:
        return "too complex" if self.seen >= self.n else None

    def fill(self, row: torch.Tensor) -> None:
        row.fill_(-1 if self.seen < self.n else 0)  # everything, then nothing

    def advance(self, token: int) -> None:
        self.seen += 1


def test_a_failing_grammar_ends_its_own_sequence_only() -> None:
    e = Engine(tiny_model(), TOK, max_batch=4)
    prompt = render(TOK, abi.ChatArgs(messages=HELLO))
    e.add(0, prompt, SamplingParams(max_tokens=30, constraint=FailsAfter(3)))
    e.add(1, prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    ends = {}
    for _ in range(40):
        for i, o in e.step(sorted({0, 1} - set(ends))).items():
            if o.finished:
                ends[i] = (o.finish_reason, o.error)
        if len(ends) == 2:
            break
    assert ends == {0: ("error", "too complex"), 1: ("length", None)}


# --- compiling: once per grammar, refusals named ----------------------------------------------


def test_grammars_compile_once_per_grammar_and_stay_bounded() -> None:
    g = Grammars(TOK, capacity=2)
    a = abi.ChatArgs(messages=HELLO, json_schema={"type": "integer"})
    b = abi.ChatArgs(messages=HELLO, regex="[a-z]+")
    c = abi.ChatArgs(messages=HELLO, choice=["x", "y"])
    for args in (a, a, b, a, c, b):
        assert g.matcher(args) is not None
    assert (g.compiled, g.hits) == (4, 2) and len(g._cache) == 2  # a was evicted by c, then b
    assert g.matcher(abi.ChatArgs(messages=HELLO)) is None  # free text: no grammar


@pytest.mark.parametrize(("fields", "words"), [
    ({"json_schema": {"type": "string", "pattern": "(("}}, "unclosed group"),
    ({"json_schema": {"type": "frobnicate"}}, "frobnicate"),
    ({"json_schema": {"$ref": "#/$defs/nope"}}, "nope"),
    ({"json_schema": {"type": "string", "format": "weird"}}, "weird"),
    ({"json_schema": {"type": "integer"}, "regex": "a+"}, "one structure at a time"),
    ({"regex": "a+", "tools": [{"function": {"name": "f"}}], "tool_choice": "required"},
     "cannot be combined with tools"),
    ({"tools": [{"function": {"name": "no spaces"}}]}, "tool name"),
    ({"json_schema": {"enum": ["x" * 1000] * 300}}, "over the limit"),
    ({"json_schema": json.loads('{"items":' * 300 + "{}" + "}" * 300)}, "recursion limit"),
])
def test_structures_that_cannot_be_enforced_are_refused_by_name(fields: dict[str, Any],
                                                                 words: str) -> None:
    args = abi.ChatArgs(messages=HELLO, **fields)
    with pytest.raises(GrammarError, match=words):
        check(args)
    with pytest.raises(GrammarError, match=words):
        Grammars(TOK).matcher(args)


def test_tool_grammar_embeds_each_schema_as_its_own_root() -> None:
    """A tool's `$defs` (pydantic's nested models) resolve inside its own arguments."""
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
              "additionalProperties": False,
              "$defs": {"P": {"type": "object", "properties": {"x": {"enum": [1, 2]}},
                              "required": ["x"], "additionalProperties": False}}}
    tools = _tools([params])
    args = abi.ChatArgs(messages=HELLO, tools=tools, tool_choice="required", max_tokens=100,
                        parallel_tool_calls=False)
    assert "%json" in (grammar_for(args) or "")
    ((text, reason, _),) = run({0: args}).values()
    assert reason == "stop"
    (call,) = _validate_calls(text, tools)
    assert json.loads(call.function.arguments)["p"]["x"] in (1, 2)
