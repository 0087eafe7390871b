"""The storage manager through a real kernel: versions and rollback, isolation, sharing by a
delegated capability, path escapes, quotas, retention, search."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdk
from tests.conftest import KernelProcess, agent, run_calls, wait_until

CONFIG = """
[kernel]
memory_embedder = "hash"
fs_quota = 30000
fs_versions_kept = 3
"""


@pytest.fixture(scope="module")
def fk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    tmp = tmp_path_factory.mktemp("fs")
    (tmp / "kernel.toml").write_text(CONFIG)
    k = KernelProcess(tmp / "state")
    k.extra_args = ["--config", str(tmp / "kernel.toml")]
    yield k.start()
    k.stop()


def test_versions_and_rollback_round_trip(fk: KernelProcess) -> None:
    with fk.connect() as c:
        fs, o = c.fs, {"owner": "vers"}
        contents = [b"one", b"two", b"three"]
        stamps = []
        for data in contents:
            stamps.append(fs.write("doc.txt", data, **o))
            time.sleep(0.01)
        assert [s.version for s in stamps] == [1, 2, 3]
        assert fs.read("doc.txt", **o) == b"three"
        assert [fs.read("doc.txt", version=v, **o) for v in (1, 2, 3)] == contents
        back = fs.rollback("doc.txt", 1, **o)
        assert back.version == 4 and fs.read("doc.txt", **o) == b"one"
        assert back.sha256 == stamps[0].sha256  # same content, same blob
        fs.rollback("doc.txt", time=stamps[1].modified_at + 0.001, **o)
        assert fs.read("doc.txt", **o) == b"two"
        assert fs.append("doc.txt", b"+more", **o).size == 8
        assert fs.read("doc.txt", **o) == b"two+more"
        # Retention keeps the newest 3; the head is never dropped.
        assert [v.version for v in fs.versions("doc.txt", **o)] == [4, 5, 6]
        assert [v.op for v in fs.versions("doc.txt", **o)] == ["rollback", "rollback", "append"]
        with pytest.raises(sdk.NotFound):
            fs.read("doc.txt", version=1, **o)
        with pytest.raises(sdk.InvalidArgument):
            fs.rollback("doc.txt", **o)


def test_tree_operations(fk: KernelProcess) -> None:
    with fk.connect() as c:
        fs, o = c.fs, {"owner": "tree"}
        fs.write("a/b/c.txt", "deep", **o)
        fs.mkdir("a/empty", **o)
        assert [(e.path, e.kind) for e in fs.list(**o)] == [("a", "dir")]
        assert [(e.path, e.kind) for e in fs.list("a", **o)] == [("a/b", "dir"),
                                                                 ("a/empty", "dir")]
        assert fs.stat("a/b/c.txt", **o).size == 4
        with pytest.raises(sdk.InvalidArgument):
            fs.write("a/b", "a dir is not a file", **o)
        with pytest.raises(sdk.InvalidArgument):
            fs.write("a/b/c.txt/d", "a file is not a dir", **o)
        with pytest.raises(sdk.Busy):
            fs.delete("a/b", **o)
        fs.delete("a/b/c.txt", **o)
        fs.delete("a/b", **o)
        with pytest.raises(sdk.NotFound):
            fs.read("a/b/c.txt", **o)
        assert [e.path for e in fs.list("a", **o)] == ["a/empty"]


def test_search_finds_files_by_content(fk: KernelProcess) -> None:
    with fk.connect() as c:
        o = {"owner": "search"}
        c.fs.write("recipes/soup.md", "tomato soup with basil and garlic", **o)
        c.fs.write("notes/taxes.md", "quarterly tax filing deadlines", **o)
        c.fs.write("bin/blob", bytes(range(256)), **o)  # not text: not indexed
        assert c.fs.search("garlic soup", k=1, **o)[0].path == "recipes/soup.md"
        c.fs.write("recipes/soup.md", "now a salad of cucumbers", **o)
        assert c.fs.search("cucumber salad", k=1, **o)[0].path == "recipes/soup.md"
        c.fs.delete("notes/taxes.md", **o)
        assert all(h.path != "notes/taxes.md" for h in c.fs.search("tax filing", **o))


def test_quota(fk: KernelProcess) -> None:
    with fk.connect() as c:
        o = {"owner": "quota"}
        c.fs.write("big", b"x" * 20000, **o)
        with pytest.raises(sdk.QuotaExceeded):
            c.fs.write("big2", b"y" * 20000, **o)
        c.fs.delete("big", **o)
        c.fs.write("big2", b"y" * 20000, **o)


def test_isolation_and_path_escapes(fk: KernelProcess) -> None:
    [wrote] = run_calls(fk, "fs-a", [["fs.write", {"path": "secret.txt", "data": "alice only"}]])
    assert wrote["ok"]["version"] == 1
    probes = run_calls(fk, "fs-b", [
        ["fs.read", {"path": "secret.txt"}],                      # not in its own namespace
        ["fs.read", {"path": "secret.txt", "owner": "fs-a"}],
        ["fs.list", {"owner": "fs-a"}],
        ["fs.stat", {"path": "secret.txt", "owner": "fs-a"}],
        ["fs.versions", {"path": "secret.txt", "owner": "fs-a"}],
        ["fs.search", {"query": "alice", "owner": "fs-a"}],
        ["fs.write", {"path": "secret.txt", "data": "x", "owner": "fs-a"}],
        ["fs.delete", {"path": "secret.txt", "owner": "fs-a"}],
        ["fs.read", {"path": "../fs-a/secret.txt"}],
        ["fs.read", {"path": "/fs-a/secret.txt"}],
        ["fs.read", {"path": "\uff0e\uff0e/fs-a/secret.txt"}],
        ["fs.read", {"path": "x\u0000y"}],
        ["fs.write", {"path": "a\u202etxt.exe", "data": "x"}],
        ["fs.search", {"query": "alice"}],
    ])
    assert [p.get("err") for p in probes] == [
        "ENOENT", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM",
        "EPERM", "EPERM", "EPERM", "EINVAL", "EINVAL", None]
    assert probes[-1]["ok"] == []
    with fk.connect() as admin:
        assert admin.fs.read("secret.txt", owner="fs-a") == b"alice only"


def test_share_mints_a_narrowed_delegated_capability(fk: KernelProcess) -> None:
    with fk.connect() as admin:
        admin.fs.write("shared/report.txt", "for bob", owner="sharer")
        admin.fs.write("private.txt", "not for bob", owner="sharer")
        admin.fs.write("theirs.txt", "someone else's", owner="other")
        # bob waits for the token in its mailbox, then uses it.
        t = "$received"
        bob = admin.proc.spawn(agent("calls"), name="bob-fs", argv=[json.dumps([
            ["ipc.recv", {"timeout_ms": 30000}],
            ["fs.read", {"path": "shared/report.txt", "owner": "sharer", "token": t}],
            ["fs.list", {"path": "shared", "owner": "sharer", "token": t}],
            ["fs.read", {"path": "private.txt", "owner": "sharer", "token": t}],
            ["fs.write", {"path": "shared/report.txt", "data": "x", "owner": "sharer",
                          "token": t}],
            ["fs.read", {"path": "shared/report.txt", "owner": "sharer"}],  # its own token
            ["ipc.send", {"to": "sharer", "data": "done"}],
        ])], caps=["ipc.send@ipc/sharer"])
        # The sharer waits for bob to be done: a share is derived from the sharer's token, and
        # the sharer's end revokes its tokens and what was derived from them.
        sharer = run_calls(fk, "sharer", [
            ["fs.share", {"path": "theirs.txt", "to": "bob-fs", "owner": "other"}],
            ["fs.share", {"path": "shared", "to": "nobody-here"}],
            ["fs.share", {"path": "shared", "to": "bob-fs", "rights": ["fs.read", "fs.list"]}],
            ["ipc.send", {"to": "bob-fs", "data": "$last"}],
            ["ipc.recv", {"timeout_ms": 30000}],
        ], caps=("ipc.send@ipc/bob-fs",))
        assert [s.get("err") for s in sharer] == ["EPERM", "ENOENT", None, None, None], sharer
        token = sharer[2]["ok"]
        info = admin.proc.wait(bob, timeout=60)
        assert info.exit_status == 0, admin.proc.logs(bob, "stderr").data.decode()
    uses = info.result[1:-1]
    assert uses[0] == {"ok": "for bob"}
    assert [e["path"] for e in uses[1]["ok"]] == ["shared/report.txt"]
    assert [u.get("err") for u in uses[2:]] == ["EPERM", "EPERM", "EPERM"]
    # Another agent presenting bob's token is refused: the token is bound to its audience.
    [stolen] = run_calls(fk, "mallory", [["fs.read", {"path": "shared/report.txt",
                                                      "owner": "sharer", "token": token}]])
    assert stolen["err"] == "EPERM"
    db = sqlite3.connect(fk.state_dir / "kernel.db")
    try:
        assert db.execute("SELECT COUNT(*) FROM tokens WHERE subject=? AND parent IS NOT NULL",
                          (f"agent:{bob}",)).fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM audit WHERE event='share'").fetchone()[0] == 1
    finally:
        db.close()


def test_unreferenced_blobs_are_collected(fk: KernelProcess) -> None:
    with fk.connect() as c:
        o = {"owner": "gc"}
        digest = c.fs.write("tmp.bin", b"short-lived blob", **o).sha256
        blob = Path(fk.state_dir) / "blobs" / digest[:2] / digest
        assert blob.exists()
        c.fs.delete("tmp.bin", **o)
        assert wait_until(lambda: not blob.exists(), timeout=5)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                     | st.binary(max_size=4), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@given(path=st.text(max_size=24), data=st.binary(max_size=64), metadata=st.dictionaries(
    st.text(max_size=6), _json, max_size=3), query=st.text(min_size=1, max_size=16))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_paths_and_memories_never_fault(fk: KernelProcess, path: str, data: bytes,
                                               metadata: dict, query: str) -> None:
    """Whatever the names and values, every call ends in a result or a typed refusal."""
    with fk.connect() as c:
        o = {"owner": "fuzz"}
        calls = [lambda: c.fs.write(path, data, **o), lambda: c.fs.append(path, data, **o),
                 lambda: c.fs.read(path, **o), lambda: c.fs.stat(path, **o),
                 lambda: c.fs.list(path, **o), lambda: c.fs.versions(path, **o),
                 lambda: c.fs.rollback(path, 1, **o), lambda: c.fs.search(query, **o),
                 lambda: c.fs.delete(path, **o),
                 lambda: c.memory.add(query, metadata, namespace="fuzz/ns"),
                 lambda: c.memory.search(query, filter={"k": query}, namespace="fuzz/ns"),
                 lambda: c.memory.search(query, mode="keyword", namespace="fuzz/ns")]
        for fn in calls:
            try:
                fn()
            except sdk.KernelFault as exc:
                raise AssertionError(f"kernel fault: {exc}") from None
            except sdk.SyscallError:
                pass
            except OverflowError:
                pass  # an int msgpack cannot carry: refused by the SDK, never sent


def test_cli(fk: KernelProcess, tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("first draft")
    assert fk.cli("fs", "put", "-o", "cli", "doc.txt", str(src)).returncode == 0
    src.write_text("second draft")
    fk.cli("fs", "put", "-o", "cli", "doc.txt", str(src))
    assert fk.cli("fs", "cat", "-o", "cli", "doc.txt").stdout == "second draft"
    assert fk.cli("fs", "rollback", "-o", "cli", "doc.txt", "1").returncode == 0
    assert fk.cli("fs", "cat", "-o", "cli", "doc.txt").stdout == "first draft"
    assert len(fk.cli("fs", "versions", "-o", "cli", "doc.txt").stdout.splitlines()) == 3
    assert "doc.txt" in fk.cli("fs", "ls", "-o", "cli").stdout
    bad = fk.cli("fs", "cat", "-o", "cli", "../x")
    assert bad.returncode == 1 and "EPERM" in bad.stderr
    memory_id = fk.cli("mem", "add", "-n", "cli/ns", "buy oat milk", "--metadata",
                       '{"list": "shopping"}').stdout.strip()
    hit = json.loads(fk.cli("mem", "search", "-n", "cli/ns", "oat milk").stdout.splitlines()[0])
    assert hit["id"] == int(memory_id) and hit["metadata"] == {"list": "shopping"}
