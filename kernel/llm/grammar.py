"""Grammar-constrained decoding on llguidance: the grammar a request's output must match,
compiled once per grammar and model, and a matcher per sequence that masks its logits.

A request asks for at most one structure (`json_schema`, JSON mode's any object, `regex`,
`choice`) and may offer tools. `grammar_for` turns that into one llguidance grammar: a JSON
Schema as is; tools as a Lark grammar whose calls are the exact shape the tool prompt
(kernel/llm/chat.py) asks for, `{"tool_calls": [{"name": ..., "arguments": ...}]}`, each call's
arguments an embedded JSON Schema (its own root, so a tool's `$defs` resolve), and with
`tool_choice="auto"` free text as the other alternative. `Grammars` (one per model, used by its
prompter thread) builds the tokenizer's llguidance view once, compiles each grammar once (an
LRU keyed by the grammar text's hash) and gives each sequence a copy of the compiled matcher.
In the engine's sampler the matcher fills a bitmask over the vocabulary each step and advances
with each token (kernel/llm/engine/sampling.py): the output matches by construction.

JSON is generated with ", " and ": " and no other whitespace (json.dumps's spelling): a small
model cannot stall in whitespace, and the text has one form. llguidance's own limits (lexer
fuel, Earley items per step, grammar size) bound the work of one mask, so a hostile grammar
fails its own request (EINVAL, at compile time or at the token where a limit is hit), never the
batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sdk import abi

if TYPE_CHECKING:
    import torch

    from kernel.llm.engine import SamplingParams

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_BYTES = 256 * 1024  # a request's grammar text (schemas included), before compiling
CACHED_GRAMMARS = 128  # compiled grammars kept per model
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names, plus "."
MAX_ERROR_CHARS = 400
CALLS_OPEN = '{"tool_calls": ['  # what every reply that calls tools starts with


class GrammarError(ValueError):
    """A structure that cannot be enforced as asked; the caller's error (EINVAL)."""


def _lit(text: str) -> str:
    """A Lark string literal matching exactly `text`."""
    return json.dumps(text, ensure_ascii=False)


def _with_options(schema: Any) -> dict[str, Any]:
    """`schema` with our JSON spelling (JSON_OPTIONS) as llguidance's per-schema options."""
    if schema is True:  # JSON Schema's "anything"
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON Schema must be an object, not {type(schema).__name__}")
    return {**schema, "x-guidance": JSON_OPTIONS}


def tool_schema(tool: dict[str, Any]) -> tuple[str, Any]:
    """(name, parameters schema) of an OpenAI tool (or a bare function)."""
    fn = tool.get("function", tool)
    if not isinstance(fn, dict):
        raise GrammarError("each tool must be an object with a function")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise GrammarError(f"tool name {name!r} must be 1-64 letters, digits, '_', '-' or '.'")
    return name, fn.get("parameters") or {"type": "object"}


def _calls_lark(tools: list[dict[str, Any]], parallel: bool) -> list[str]:
    """Lark rules for a reply that is only tool calls (rule `calls`)."""
    rules, alternatives = [], []
    for i, tool in enumerate(tools):
        name, params = tool_schema(tool)
        alternatives.append(f"call_{i}")
        head = '{"name": ' + json.dumps(name) + ', "arguments": '
        rules.append(f"call_{i}: {_lit(head)} args_{i} {_lit('}')}")
        rules.append(f"args_{i}: %json {json.dumps(_with_options(params))}")
    more = f" ({_lit(', ')} call)*" if parallel else ""
    return [f"calls: {_lit(CALLS_OPEN)} call{more} {_lit(']}')}",
            f"call: {' | '.join(alternatives)}", *rules]


def grammar_for(args: abi.ChatArgs) -> str | None:
    """The llguidance grammar `args` asks its output to match, or None (free text)."""
    from llguidance import LLMatcher

    asked = [name for name, value in (("json_schema", args.json_schema), ("regex", args.regex),
                                      ("choice", args.choice)) if value is not None]
    if len(asked) > 1:
        raise GrammarError(f"ask for one structure at a time, not {' and '.join(asked)}")
    schema = args.json_schema
    if schema is None and args.response_format == "json":
        schema = {"type": "object"}
    tools = args.tools if args.tools and args.tool_choice != "none" else None
    if tools:
        if args.regex is not None or args.choice is not None:
            raise GrammarError(f"{asked[0]} cannot be combined with tools")
        rules = _calls_lark(tools, args.parallel_tool_calls)
        if args.tool_choice == "required":
            start = "start: calls"
        elif schema is not None:  # a call, or an answer that fits the schema
            start = "start: calls | answer"
            rules.append(f"answer: %json {json.dumps(_with_options(schema))}")
        else:  # a call, or text that does not start like one
            start = 'start: calls | TEXT | ""'
            rules.append("TEXT: /[^{](?s:.)*/")
        return LLMatcher.grammar_from_lark("\n".join([start, *rules]))
    if schema is not None:
        try:
            return LLMatcher.grammar_from_json_schema(_with_options(schema))
        except ValueError as exc:
            raise GrammarError(f"json_schema: {exc}") from None
    if args.regex is not None:
        return LLMatcher.grammar_from_regex(args.regex)
    if args.choice is not None:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(_lit(c) for c in args.choice))
    return None


def check(args: abi.ChatArgs) -> None:
    """Raise GrammarError if the structure `args` asks for cannot be compiled (any tokenizer's
    vocabulary would do as well: this is the grammar's own check, done at a door's edge)."""
    from llguidance import LLMatcher

    grammar = grammar_for(args)
    if grammar is None:
        return
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {len(grammar)} bytes, over the limit of "
                           f"{MAX_GRAMMAR_BYTES}")
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError(messages[0][:MAX_ERROR_CHARS])


class Matcher:
    """One sequence's place in its grammar (the engine's sampling.TokenConstraint)."""

    def __init__(self, matcher: Any, vocab: int) -> None:
        self._m = matcher
        self.vocab = vocab

    @property
    def complete(self) -> bool:
        """Nothing more may follow (only EOS would): the output is whole."""
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def error(self) -> str | None:
        return self._m.get_error()[:MAX_ERROR_CHARS] if self._m.is_error() else None

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (int32, (vocab + 31) // 32 words)."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> None:
        self._m.consume_token(token)


class Grammars:
    """A model's compiled grammars. Not thread-safe: its prompter thread alone compiles."""

    def __init__(self, tokenizer: Any, capacity: int = CACHED_GRAMMARS) -> None:
        self._hf = tokenizer
        self._tokenizer: Any = None
        self._limits: Any = None
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self.capacity = capacity
        self.compiled = self.hits = 0

    def tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (~0.5 s for 49k tokens), built at first use."""
        if self._tokenizer is None:
            import llguidance
            import llguidance.hf

            try:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf)
            except ValueError as exc:  # a slow (Python) tokenizer
                raise GrammarError(f"this model's tokenizer cannot be constrained: {exc}") from None
            self._limits = llguidance.LLParserLimits(verbose_errors=False)
        return self._tokenizer

    def compile(self, grammar: str) -> Any:
        """The compiled matcher for `grammar` (no tokens consumed), from the cache if there."""
        from llguidance import LLMatcher

        if len(grammar) > MAX_GRAMMAR_BYTES:
            raise GrammarError(f"the grammar is {len(grammar)} bytes, over the limit of "
                               f"{MAX_GRAMMAR_BYTES}")
        key = hashlib.sha256(grammar.encode()).digest()
        template = self._cache.get(key)
        if template is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return template
        tokenizer = self.tokenizer()
        template = LLMatcher(tokenizer, grammar, log_level=0, limits=self._limits)
        if template.is_error():
            raise GrammarError(template.get_error()[:MAX_ERROR_CHARS])
        self.compiled += 1
        self._cache[key] = template
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return template

    def matcher(self, args: abi.ChatArgs) -> Matcher | None:
        """A fresh matcher for the structure `args` asks for, or None for free text."""
        grammar = grammar_for(args)
        if grammar is None:
            return None
        template = self.compile(grammar)
        return Matcher(template.deep_copy(), self._tokenizer.vocab_size)


def sampling_params(args: abi.ChatArgs, constraint: Matcher | None) -> SamplingParams:
    from kernel.llm.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, stop=list(args.stop), seed=args.seed,
                          ignore_eos=args.ignore_eos, constraint=constraint)
