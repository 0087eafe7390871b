"""Fail when a test function cannot fail: it must assert, expect an exception, or call a helper
that does.

A test passes the check when its body (nested functions and `with` blocks included) holds an
`assert`, a `raise AssertionError`, a `pytest.raises`/`warns`/`fail`, an `assert_*` call
(unittest, torch.testing), or a call to a helper that passes the same check: helpers are every
function defined under tests/ (by name), resolved to a fixed point, so `check_reply(...)` counts
when `check_reply` asserts. A test that checks by other means says why on its `def` line, a
decorator line or the line before them: `# no-assert: reason`.

Usage: python tools/testlint.py [paths...]   (default: tests/)
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

EXPECTS = {"raises", "warns", "fail", "deprecated_call"}
MARK = "# no-assert:"


def _calls(node: ast.AST) -> Iterator[str]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and _name(sub.func):
            yield _name(sub.func)


def _checks_directly(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assert):
            return True
        if isinstance(sub, ast.Raise) and sub.exc is not None:
            exc = sub.exc.func if isinstance(sub.exc, ast.Call) else sub.exc
            if isinstance(exc, ast.Name) and exc.id == "AssertionError":
                return True
        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                and sub.func.attr in EXPECTS and isinstance(sub.func.value, ast.Name)
                and sub.func.value.id == "pytest"):
            return True
        if isinstance(sub, ast.Call) and _name(sub.func).startswith("assert"):
            return True  # unittest's, torch.testing's and numpy.testing's assert_* helpers
    return False


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _tests(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level test functions and test methods of Test* classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                node.name.startswith("test"):
            yield node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and \
                        item.name.startswith("test"):
                    yield item


def _excused(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    around = lines[max(first - 2, 0):node.lineno]  # the line before, decorators, the def line
    return any(MARK in line and line.split(MARK, 1)[1].strip() for line in around)


def check(paths: list[Path]) -> list[str]:
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py"))})
    trees = {f: ast.parse(f.read_text(), str(f)) for f in files}
    helpers: dict[str, list[ast.AST]] = {}
    for tree in trees.values():
        for fn in _functions(tree):
            helpers.setdefault(fn.name, []).append(fn)
    checking = {name for name, fns in helpers.items() if any(map(_checks_directly, fns))}
    while True:  # a helper that calls a checking helper checks
        more = {name for name, fns in helpers.items() if name not in checking
                and any(c in checking for fn in fns for c in _calls(fn))}
        if not more:
            break
        checking |= more
    problems = []
    for f, tree in trees.items():
        lines = f.read_text().splitlines()
        for test in _tests(tree):
            if _checks_directly(test) or any(c in checking for c in _calls(test)):
                continue
            if not _excused(test, lines):
                problems.append(f"{f}:{test.lineno}: {test.name} asserts nothing "
                                f"(add an assert, or '{MARK} reason')")
    return problems


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [Path(__file__).resolve().parent.parent / "tests"]
    problems = check(paths)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
