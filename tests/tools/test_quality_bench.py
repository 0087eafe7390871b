"""tools/bench/quality.py's scoring: an answer passes when the program it holds (a ```python
block or the bare text, a whole function or only its body) passes the problem's tests in a
fresh interpreter to their end; a wrong, broken, endless or early-exiting one does not."""

from __future__ import annotations

import importlib.util
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools" / "bench"))
_spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "tools/bench/quality.py")
quality = sys.modules["bench_quality"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

# In HumanEval's shape: a header with an import and a docstring, tests as check(candidate).
PROBLEM = {
    "task_id": "Test/0",
    "prompt": 'from math import gcd\n\n\ndef lcm(a: int, b: int) -> int:\n    """Least common'
              ' multiple."""\n',
    "entry_point": "lcm",
    "test": "def check(candidate):\n    assert candidate(4, 6) == 12\n"
            "    assert candidate(7, 3) == 21\n",
}


def test_whole_functions_and_bodies_pass_in_or_out_of_a_code_block() -> None:
    body = "    return a * b // gcd(a, b)\n"
    whole = "def lcm(a, b):\n" + body
    assert quality.passes(PROBLEM, body)
    assert quality.passes(PROBLEM, whole)  # the header's import is added to it
    assert quality.passes(PROBLEM, f"Here it is:\n```python\n{whole}```\nDone.")
    assert quality.passes(PROBLEM, f"```py\n{whole}")  # a block the model did not close


def test_wrong_broken_endless_and_missing_answers_fail() -> None:
    assert not quality.passes(PROBLEM, "    return a * b\n")
    assert not quality.passes(PROBLEM, "def lcm(a, b) return 1")
    assert not quality.passes(PROBLEM, "    while True:\n        pass\n", timeout=2)
    assert not quality.passes(PROBLEM, None)
    # Exiting 0 before the tests have run is no pass.
    assert not quality.passes(PROBLEM, "    return 0\nimport os\nos._exit(0)\n")


def test_the_agent_is_given_the_problem_and_its_tests_as_the_check() -> None:
    argv = quality.argv(PROBLEM, tries=2, max_tokens=99)
    assert argv[:4] == ["--tries", "2", "--max-tokens", "99"]
    assert argv[4] == "--check" and "check(lcm)" in argv[5] and repr(PROBLEM["test"]) in argv[5]
    assert argv[6].endswith(PROBLEM["prompt"])
