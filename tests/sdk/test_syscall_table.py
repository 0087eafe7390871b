"""One syscall table for both sides: the kernel and the SDK agree with sdk/syscalls.py.

The declaration names every syscall once; these tests fail when the kernel binds a name the
declaration lacks (or misses one), when a handler's types disagree with the declared ones,
when an SDK family sends a syscall that is not declared, sends the wrong argument struct or
decodes a result with another type, when a declared syscall is reachable from no SDK family
without being marked as the CLI's or the connection's, and when docs/abi.md is stale.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import sdk
from kernel.syscalls import IMPLS, SYSCALLS, bind
from sdk import abi
from sdk.families import attach
from sdk.syscalls import CLI, CONNECTION, SDK, SIGNATURES, Family, known_op
from tests.conftest import ROOT


def test_the_kernel_binds_exactly_the_declared_syscalls() -> None:
    assert list(SYSCALLS) == list(SIGNATURES)
    for name, entry in SYSCALLS.items():
        declared = SIGNATURES[name]
        assert entry.signature is declared and entry.args is declared.args, name
        # A rule may name a resource exactly where the kernel computes one.
        assert (entry.resource is None) == (declared.resource is None), name


def test_a_kernel_table_that_disagrees_refuses_to_load() -> None:
    with pytest.raises(RuntimeError, match=r"no handler for \['proc.kill'\]"):
        bind({name: impl for name, impl in IMPLS.items() if name != "proc.kill"})
    with pytest.raises(RuntimeError, match=r"no declaration of \['proc.fly'\]"):
        bind({**IMPLS, "proc.fly": IMPLS["proc.kill"]})
    # And at import, before the kernel can start: declare one more syscall than it handles.
    code = ("import sdk.syscalls as s; "
            "s.SIGNATURES['proc.fly'] = s.Signature('proc.fly', s.abi.NoArgs, None); "
            "import kernel.syscalls")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode != 0 and "no handler for ['proc.fly']" in out.stderr, out.stderr


def _annotation(handler: Any, text: str) -> Any:
    return eval(text, {**handler.__globals__, "abi": abi})


def test_kernel_handlers_take_and_return_the_declared_types() -> None:
    for name, entry in SYSCALLS.items():
        declared, handler = entry.signature, entry.handler
        params = list(inspect.signature(handler).parameters.values())
        assert _annotation(handler, params[2].annotation) is declared.args, name
        returns = inspect.signature(handler).return_annotation
        if returns != "Any":  # a handler that may park its call returns PENDING meanwhile
            assert _annotation(handler, returns) == declared.result, name


class Recorder:
    """Takes a connection's place to keep what each family method sends instead of sending it:
    which syscall a method makes, with what, and how it decodes the answer, is the SDK's half
    alone (tests/kernel/test_kernel.py and the rest run the same methods against a kernel)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, abi.Args | None, Any, Any]] = []
        attach(self)

    def call(self, name: str, args: abi.Args | None = None, result_type: Any = Any,
             **wait: Any) -> None:
        self.sent.append((name, args, result_type, None))

    def stream(self, name: str, args: abi.Args | None, chunk_type: Any, result_type: Any,
               **wait: Any) -> None:
        self.sent.append((name, args, result_type, chunk_type))


_CHAT = [{"role": "user", "content": "hi"}]
# Each public method of each family (`conn.<family>.<method>`), with arguments that build a
# valid request. A method new to a family fails the test until it is listed here.
METHODS: dict[str, tuple[Any, ...]] = {
    "sys.null": (), "sys.stats": (),
    "proc.spawn": ("/a.py",), "proc.ps": (), "proc.info": (1,), "proc.wait": (1,),
    "proc.kill": (1,), "proc.exit": (), "proc.logs": (1,), "proc.suspend": (1,),
    "proc.resume": (1,),
    "ipc.send": ("bob", "hi"), "ipc.recv": (),
    "llm.chat": (_CHAT,), "llm.stream": (_CHAT,), "llm.cancel": (1,), "llm.models": (),
    "caps.delegate": ("bob",), "caps.revoke": ("0" * 32,), "caps.inspect": (),
    "caps.list": (), "caps.rotate": (), "caps.export": (),
    "approvals.list": (), "approvals.approve": (1,), "approvals.deny": (1,),
    "audit.read": (), "audit.verify": (),
    "memory.add": ("x",), "memory.get": (1,), "memory.update": (1, "x"),
    "memory.delete": (1,), "memory.list": (), "memory.search": ("x",),
    "memory.embed": (["x"],),
    "fs.read": ("a",), "fs.write": ("a", "x"), "fs.append": ("a", "x"), "fs.list": (),
    "fs.stat": ("a",), "fs.delete": ("a",), "fs.mkdir": ("a",), "fs.versions": ("a",),
    "fs.rollback": ("a", 1), "fs.share": ("a", "bob"), "fs.search": ("x",),
    "tools.list": (), "tools.call": ("calculator", {"expression": "1"}),
    "tools.mount": ("m", ["true"]), "tools.unmount": ("m",), "tools.mounts": (),
}
# Methods whose syscall is not their own name.
VIA = {"llm.stream": "llm.chat"}
# Methods that make no syscall of their own: `shared` opens a connection for the same family;
# `call_many` is `tools.call` several at once (its result type read from the same declaration,
# run against a kernel in tests/kernel/tools/test_tools.py).
HELPERS = {"fs.shared", "tools.call_many"}


def _family_methods(conn: Recorder) -> set[str]:
    found = set()
    for attr, family in vars(conn).items():
        if isinstance(family, Family):
            found |= {f"{attr}.{m}" for m, _ in inspect.getmembers(type(family),
                                                                   inspect.isfunction)
                      if not m.startswith("_")}
    return found


def test_every_family_method_sends_a_declared_syscall_with_its_declared_types() -> None:
    conn = Recorder()
    assert _family_methods(conn) == METHODS.keys() | HELPERS
    reached = set()
    for method, argv in METHODS.items():
        attr, _, op = method.partition(".")
        getattr(getattr(conn, attr), op)(*argv)
        assert len(conn.sent) == 1, method
        name, args, result_type, chunk_type = conn.sent.pop()
        assert name == VIA.get(method, method), method
        declared = SIGNATURES[name]
        assert type(args) is declared.args or (args is None and declared.args is abi.NoArgs), \
            method
        assert result_type == declared.result, method
        if chunk_type is not None:
            assert chunk_type == declared.chunk, method
        reached.add(name)
    sdk_made = {name for name, s in SIGNATURES.items() if s.made_by == SDK}
    assert reached == sdk_made


def test_syscalls_no_family_makes_are_made_by_the_cli_or_the_connection() -> None:
    sources = {CLI: [p.read_text() for p in (ROOT / "userland").rglob("*.py")],
               CONNECTION: [(ROOT / "sdk" / "client.py").read_text()]}
    others = [s for s in SIGNATURES.values() if s.made_by != SDK]
    assert others, "the CLI's remote.* and the connection's sys.rings"
    for s in others:
        assert s.made_by in sources, s
        assert any(f'"{s.name}"' in text for text in sources[s.made_by]), s.name


def test_known_op_reads_the_declaration() -> None:
    assert all(known_op(name) for name in SIGNATURES)
    assert known_op("*") and known_op("fs.*") and known_op("remote.*")
    assert not known_op("fs.nope") and not known_op("nope.*") and not known_op("fs")


def test_agent_only_syscalls_refuse_other_callers(admin: sdk.Connection) -> None:
    agent_only = [s for s in SIGNATURES.values() if s.agent_only]
    assert {s.name for s in agent_only} == {"proc.exit", "ipc.recv"}
    for s in agent_only:
        with pytest.raises(sdk.InvalidArgument):
            admin.call(s.name, s.args())


def _abidoc() -> Any:
    spec = importlib.util.spec_from_file_location("abidoc", ROOT / "tools" / "abidoc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_abi_md_lists_the_declared_syscalls() -> None:
    abidoc = _abidoc()
    text = Path(abidoc.DOC).read_text()
    assert abidoc.current(text) == text, "docs/abi.md is stale: run python tools/abidoc.py"
    for name in SIGNATURES:
        assert f"| `{name}`" in text, name
