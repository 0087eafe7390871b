"""Layering: userland and the SDK reach the kernel only through syscalls, or by running it as
a program (`python -m kernel`, `python -m kernel.llm.store pull`), never by importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_IMPORTERS = {"import_module", "__import__"}


def _imported(node: ast.AST) -> list[str]:
    """The absolute module names `node` imports (statements, and import_module("...") calls)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        first = node.args[0]
        if name in _IMPORTERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [first.value]
    return []


def kernel_imports(package: str) -> tuple[int, list[str]]:
    """(files read, `path:line: module` for every import of kernel code) under `package`."""
    files = sorted((ROOT / package).rglob("*.py"))
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}"
                      for name in _imported(node) if name.split(".")[0] == "kernel"]
    return len(files), found


@pytest.mark.parametrize("package", ["userland", "sdk"])
def test_never_imports_kernel(package: str) -> None:
    files, found = kernel_imports(package)
    assert files > 5  # the walk saw the package, so an empty answer means something
    assert found == []


def test_the_walk_sees_every_form_of_import(tmp_path: Path) -> None:
    source = ("import kernel\nimport os, kernel.boot as b\nfrom kernel.llm import store\n"
              "def f():\n    from kernel import boot\n    importlib.import_module('kernel.x')\n"
              "from . import kernel\nfrom sdk import models\n")
    names = [n for node in ast.walk(ast.parse(source)) for n in _imported(node)]
    assert sorted(n for n in names if n.split(".")[0] == "kernel") == [
        "kernel", "kernel", "kernel.boot", "kernel.llm", "kernel.x"]
