"""JSON mode's automaton: it accepts exactly valid JSON-object prefixes, and closes any of them."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.llm.jsonmode import JsonState

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=5)


def _prefix_ok(text: str) -> bool:
    return JsonState().feed(text)


@settings(max_examples=400, deadline=None)
@given(objects, st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans())
def test_every_prefix_of_a_json_object_is_accepted_and_closable(
        obj: dict, separators: tuple[str, str], ascii_only: bool) -> None:
    text = json.dumps(obj, separators=separators, ensure_ascii=ascii_only)
    state = JsonState()
    for i, c in enumerate(text):
        assert state.feed(c), f"rejected {text[: i + 1]!r}"
        closed = text[: i + 1] + state.closing()
        assert isinstance(json.loads(closed), dict), closed
    assert state.complete and state.closing() == ""


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet='{}[]",:0123456789.eE+-truefalsn \\ux', max_size=40))
def test_any_accepted_text_closes_into_valid_json(text: str) -> None:
    state = JsonState()
    if not state.feed(text):
        return
    closed = text + state.closing()
    assert isinstance(json.loads(closed), dict), closed
    if state.complete:
        json.loads(text)


def test_rejects_what_json_rejects() -> None:
    for bad in ['[1]', '{"a" 1}', '{"a":01}', '{"a":1,}', '{"a":tru }', '{"a":"\x01"}',
                '{}x', '{"a":1.}', '{"a":-}', '{"a":"\\q"}', '{"a":1}      ']:
        ok = _prefix_ok(bad)
        if ok:
            state = JsonState()
            state.feed(bad)
            assert not state.complete, bad
        else:
            assert not ok, bad


def test_closing_examples() -> None:
    cases = {'': '{}', '{': '}', '{"k': '":null}', '{"k"': ':null}', '{"k":': 'null}',
             '{"k":[1,': 'null]}', '{"k":-': '0}', '{"k":1e': '0}', '{"k":"\\u12': '00"}',
             '{"k":t': 'rue}', '{"a":1,': '"":null}'}
    for prefix, suffix in cases.items():
        state = JsonState()
        assert state.feed(prefix), prefix
        assert state.closing() == suffix, prefix
        json.loads(prefix + suffix)


def test_whitespace_runs_are_capped() -> None:
    state = JsonState()
    assert state.feed('{"a": ')
    assert not state.allows("      ")
