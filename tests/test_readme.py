"""The README's examples are tests: every `sh` and `python` block of the README and of docs/
runs, top to bottom, in one shell, against a fresh state dir, as a newcomer would paste it.

The only block a walk leaves out is one marked in the document's source, on the line before
its fence, with `<!-- not-run: REASON -->`; the reason is printed with the walk. A `python`
block with a comment naming `agentos run … FILE.py …` is saved as FILE.py and that command is
run; another `python` block runs as a script. The walk's world differs from a newcomer's in
three ways only, each so it can run in CI beside other tests:
- the model store holds the tiny random test model under the name `smollm2` (no download);
- the ports the documents use (8000, 7777) are replaced by free ones;
- the work dir is a fresh directory beside the repository (the strict tier hides /tmp from
  agents) with `.venv`, `userland` and `tools` linked in, so relative paths resolve as in a
  clone and files the examples write stay out of the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_TIER

DOCUMENTS = ("README.md", "docs/agents.md", "docs/operations.md", "docs/architecture.md",
             "docs/benchmarks.md")
# Documents whose examples talk to a kernel they do not boot themselves: the walk boots one
# first, as the README's tour does.
NEEDS_KERNEL = {"docs/agents.md"}
PORTS = (8000, 7777)
LINKED = (".venv", "userland", "tools")

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
TABLE = re.compile(r"^\|.*\|\n\|[-| :]+\|\n(?:\|.*\|\n)+", re.M)
ROW = re.compile(r"^\|[^|\n]*\|\s*`(agentos [^`]+)`\s*\|", re.M)
RUN_COMMENT = re.compile(r"#\s*(agentos run .*?(\S+\.py).*)$", re.M)


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str
    skip: str | None  # the reason given in the source, or None: it runs


def _marker(text: str, start: int) -> str | None:
    before = text[:start].rstrip().splitlines()
    marker = NOT_RUN.fullmatch(before[-1].strip()) if before else None
    return marker[1] if marker else None


def blocks(doc: str) -> list[Block]:
    """The document's `sh` and `python` blocks, and the `agentos …` commands in the first
    column after a table's name column (a table marked not-run is left out whole), in order."""
    text = (ROOT / doc).read_text()
    found = []
    for m in FENCE.finditer(text):
        if m[1] in ("sh", "python"):  # not diagrams or output
            found.append(Block(doc, text.count("\n", 0, m.start()) + 1, m[1], m[2],
                               _marker(text, m.start())))
    for m in TABLE.finditer(text):
        skip = _marker(text, m.start())
        for row in ROW.finditer(m[0]):
            start = m.start() + row.start()
            found.append(Block(doc, text.count("\n", 0, start) + 1, "sh", row[1] + "\n", skip))
    return sorted(found, key=lambda b: b.line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(doc_blocks: list[Block], ports: dict[int, int], boot: bool) -> str:
    """One bash script: each block in order, announced on stderr, stopping at the first
    command that fails."""
    out = ["set -euo pipefail"]
    if boot:
        out.append("agentos boot --daemon >/dev/null")
    for i, b in enumerate(doc_blocks):
        out.append(f"echo '=== {b.doc}:{b.line}' >&2")
        code = b.code
        for old, new in ports.items():
            code = code.replace(f":{old}", f":{new}")
        if b.lang == "sh":
            out.append(code)
            continue
        run = RUN_COMMENT.search(code)
        if run:
            out += [f"cat > {run[2]} <<'AGENTOS_BLOCK_{i}'", code.rstrip("\n"),
                    f"AGENTOS_BLOCK_{i}", run[1]]
        else:
            out += [f"python - <<'AGENTOS_BLOCK_{i}'", code.rstrip("\n"), f"AGENTOS_BLOCK_{i}"]
    return "\n".join(out) + "\n"


def _own_activate(work: Path) -> None:
    """A venv copied from another checkout (a git worktree's) keeps that checkout's path in
    `bin/activate`; the walk's `.venv` then gets an activate naming this one, so
    `. .venv/bin/activate` runs this checkout's code, as it does in a clone."""
    activate = (ROOT / ".venv" / "bin" / "activate").read_text()
    named = re.search(r'^VIRTUAL_ENV="?([^"\n]+)"?$', activate, re.M)
    if named is None or Path(named[1]) == ROOT / ".venv":
        return
    (work / ".venv").unlink()
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "activate").write_text(
        activate.replace(named[1], str(ROOT / ".venv")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A model store holding the tiny model as `smollm2`, so `agentos model pull smollm2`
    finds it there and returns at once, as it does once the real one is pulled."""
    from kernel.llm.store import ModelStore

    # In this process, which has torch imported already (tiny_dir): a `model pull` subprocess
    # would spend seconds importing it again (the CLI's pull has tests of its own).
    store = tmp_path_factory.mktemp("models")
    ModelStore(store).pull("smollm2", source=tiny_dir, progress=False)
    assert ModelStore(store).path("smollm2")
    return store


@pytest.fixture
def world(tmp_path: Path, model_dir: Path) -> Iterator[dict[str, str]]:
    """A fresh state dir and work dir; the kernel a walk boots is stopped afterwards."""
    work = ROOT / f".readme-walk-{os.getpid()}-{tmp_path.name}"
    work.mkdir(mode=0o755)
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    _own_activate(work)
    state = tmp_path / "state"
    config = tmp_path / "agentos.toml"
    config.write_text(f'[kernel]\nsandbox = "{TEST_TIER}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTOS_")}
    env.update({"AGENTOS_STATE_DIR": str(state), "AGENTOS_MODEL_DIR": str(model_dir),
                "AGENTOS_CONFIG": str(config), "WORK": str(work),
                "PATH": f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"})
    try:
        yield env
    finally:
        lock = state / "kernel.lock"
        pid = lock.read_text().strip() if lock.exists() else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(400)  # a boot, a first model load and a few generations on 2 cores
@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_example_runs_as_written(doc: str, world: dict[str, str]) -> None:
    found = blocks(doc)
    for b in found:
        if b.skip is not None:
            assert len(b.skip) > 10, f"{doc}:{b.line}: say why it cannot run"
            print(f"not run: {doc}:{b.line}: {b.skip}")
    runnable = [b for b in found if b.skip is None]
    if not runnable:
        pytest.skip(f"{doc}: every block is marked not-run")
    ports = {old: _free_port() for old in PORTS}
    text = script(runnable, ports, boot=doc in NEEDS_KERNEL)
    done = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=600,
                          cwd=world["WORK"], env=world)
    walked = [line for line in done.stderr.splitlines() if line.startswith("=== ")]
    assert done.returncode == 0, (
        f"{walked[-1] if walked else doc} failed (exit {done.returncode}):\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}")
    assert len(walked) == len(runnable)


def test_the_walk_finds_the_examples() -> None:
    """The parser sees the README's tour and the markers, so a walk that runs nothing cannot
    pass silently."""
    readme = blocks("README.md")
    assert any(b.lang == "sh" and "agentos boot --daemon" in b.code and b.skip is None
               for b in readme)
    assert any(b.lang == "python" and b.skip is None for b in readme)
    assert all(b.skip for b in readme if "make demo" in b.code)
