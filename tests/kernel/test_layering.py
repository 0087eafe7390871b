"""Layering: userland and the SDK reach the kernel only through syscalls, or by running it as
a program (`python -m kernel`, `python -m kernel.llm.store pull`), never by importing it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

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


KERNEL = ROOT / "kernel"
ROOMS = [*sorted(p.name for p in KERNEL.iterdir() if (p / "__init__.py").exists()), "call"]


def _room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "kernel" and parts[1] in ROOMS else None


def _room_imports(room: str, runtime_only: bool = True) -> set[str]:
    """The other rooms that modules of `room` import (at run time: TYPE_CHECKING blocks, which
    name the Kernel for annotations, are left out when `runtime_only`)."""
    path = KERNEL / room
    files = sorted(path.rglob("*.py")) if path.is_dir() else [KERNEL / f"{room}.py"]
    found: set[str] = set()
    for file in files:
        tree = ast.parse(file.read_text(), str(file))
        skip: set[int] = set()
        if runtime_only:
            for node in ast.walk(tree):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    skip.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for name in _imported(node):
                other = _room_of(name)
                if other is not None and other != room:
                    found.add(other)
    return found


def test_kernel_call_is_a_leaf() -> None:
    assert _room_imports("call", runtime_only=False) == set()


def test_no_import_cycle_between_kernel_rooms() -> None:
    graph = {room: _room_imports(room) for room in ROOMS}
    assert {"access", "doors", "llm", "memory", "proc", "storage", "tools"} <= set(graph)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(room: str, path: list[str]) -> None:
        state[room] = 1
        for other in sorted(graph[room]):
            if state.get(other) == 1:
                cycles.append([*path[path.index(other):], other] if other in path
                              else [*path, other])
            elif other not in state:
                visit(other, [*path, other])
        state[room] = 2

    for room in ROOMS:
        if room not in state:
            visit(room, [room])
    assert cycles == []


@pytest.mark.parametrize("room", ROOMS)
def test_each_kernel_room_imports_alone(room: str) -> None:
    out = subprocess.run([sys.executable, "-c", f"import kernel.{room}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
