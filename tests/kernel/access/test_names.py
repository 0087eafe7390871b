"""Agent names are owned (kernel/access/names.py): an agent's files, memories and mail are keyed
by its name, so starting an agent under a name that has a past needs the name's owner or its
rights; a fresh name is the spawner's. Real kernels, real sandboxed agents."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

import sdk
from kernel.access.audit import AuditLog
from kernel.db import SCHEMA, Database
from tests.conftest import KernelProcess, agent, wait_until

NOTE = "the keeper's private note"
MEMORY = "the keeper remembers this"
KEPT = {"note": NOTE, "memories": [MEMORY]}


def audit_events(k: KernelProcess) -> list[dict]:
    return AuditLog(Database(k.state_dir / "kernel.db")).rows(limit=100000)


def parent(conn: sdk.Connection, steps: list[dict], name: str, caps: tuple[str, ...] = (),
           **options: object) -> list:
    """Run the `parent` agent (it holds proc.spawn and proc.wait besides `caps`); its report."""
    pid = conn.proc.spawn(agent("parent"), argv=[json.dumps(steps)], name=name,
                          caps=["proc.spawn", "proc.wait", *caps], **options)
    info = conn.proc.wait(pid, timeout=120)
    assert info.exit_status == 0, conn.proc.logs(pid, "stderr").data.decode()
    return info.result


def keeper(task: str, name: str, **step: object) -> dict:
    return {"path": agent("keeper"), "argv": [task], "name": name, "wait": True, **step}


def test_a_past_agents_name_cannot_be_squatted(kernel: KernelProcess) -> None:
    """The attack of issue 15: an agent holding proc.spawn but no right on `the-victim`'s files
    starts a child named `the-victim` after the real one ended, to read and overwrite its note and
    memories and take its mail. Every way of naming the child is refused, the victim's data is
    untouched, and the refusal is audited."""
    with kernel.connect() as conn:
        victim = conn.proc.spawn(agent("keeper"), argv=["write"], name="the-victim")
        assert conn.proc.wait(victim, timeout=60).result == KEPT
        said = parent(conn, [
            keeper("overwrite", "the-victim"),  # by name
            {**keeper("overwrite", None), "copy_as": "sub/the-victim.py"},  # named after its file
        ], name="squatter")
        assert said == ["EPERM", "EPERM"], said
        # Nobody runs as `the-victim`: a message to it finds no receiver instead of an impostor.
        with pytest.raises(sdk.NotFound):
            conn.ipc.send("the-victim", {"for": "the victim"})
        assert [v.version for v in conn.fs.versions("notes.txt", owner="the-victim")] == [1]
        assert conn.fs.read("notes.txt", owner="the-victim").decode() == NOTE
        again = conn.proc.spawn(agent("keeper"), argv=["read"], name="the-victim")  # the admin's
        assert conn.proc.wait(again, timeout=60).result == KEPT
    squatter = next(a.id for a in conn_ps(kernel) if a.name == "squatter")
    denied = [e for e in audit_events(kernel) if e["event"] == "deny"
              and e["principal"] == f"agent:{squatter}"]
    assert len(denied) == 2 and "belongs to user:" in denied[0]["detail"]["reason"]


def conn_ps(kernel: KernelProcess) -> list:
    with kernel.connect() as conn:
        return conn.proc.ps()


def test_a_fresh_name_is_the_spawners_to_run_again(kernel: KernelProcess) -> None:
    with kernel.connect() as conn:
        # A parent claims a fresh name, runs its worker again later (it owns the name)...
        said = parent(conn, [keeper("write", "worker-a"), keeper("read", "worker-a")],
                      name="parent-a")
        assert said == [KEPT, KEPT], said
        # ...and another parent, with the same rights otherwise, cannot.
        said = parent(conn, [keeper("overwrite", "worker-a"), keeper("write", "worker-b")],
                      name="parent-b")
        assert said == ["EPERM", KEPT], said
        assert conn.fs.read("notes.txt", owner="worker-a").decode() == NOTE


def test_holding_a_names_rights_shares_it(kernel: KernelProcess) -> None:
    """The owner shares a name by granting its rights: the holder may run it, and then owns it
    (the previous owner keeps its rights, not the name)."""
    with kernel.connect() as conn:
        first = conn.proc.spawn(agent("keeper"), argv=["write"], name="shared")
        assert conn.proc.wait(first, timeout=60).result == KEPT
        # Reading rights alone are not enough: they do not cover what the name gives.
        said = parent(conn, [keeper("read", "shared")], name="reader",
                      caps=("fs.read@fs/agent/shared", "memory.list@mem/agent/shared"))
        assert said == ["EPERM"], said
        said = parent(conn, [keeper("read", "shared")], name="trusted",
                      caps=("fs.*@fs/agent/shared", "memory.*@mem/agent/shared"))
        assert said == [KEPT], said
    owner = kernel_db(kernel).execute("SELECT owner FROM names WHERE name='shared'").fetchone()
    trusted = next(a.id for a in conn_ps(kernel) if a.name == "trusted")
    assert owner == (f"agent:{trusted}",)


def kernel_db(kernel: KernelProcess) -> sqlite3.Connection:
    return sqlite3.connect(kernel.state_dir / "kernel.db")


def test_a_name_with_stored_state_is_not_fresh(kernel: KernelProcess) -> None:
    """Files kept under a name no agent ever had (the admin seeded them) are not the first
    spawner's to read."""
    with kernel.connect() as conn:
        conn.fs.write("notes.txt", "seeded for the real agent", owner="seeded")
        conn.memory.add("seeded memory", namespace="agent/seeded-mem")
        said = parent(conn, [keeper("read", "seeded"), keeper("read", "seeded-mem")],
                      name="early")
        assert said == ["EPERM", "EPERM"], said


def test_restart_keeps_the_name_and_its_state(fresh_kernel: KernelProcess,
                                              tmp_path: Path) -> None:
    """A restart is the same agent: it finds what its first run stored; while it waits out its
    backoff, nobody (the admin included) starts another agent under its name. Ownership is
    durable across a kernel restart."""
    config = tmp_path / "agentos.toml"
    config.write_text("[kernel]\nrestart_backoff = 2.0\n")
    fresh_kernel.extra_args = ["--config", str(config)]
    k = fresh_kernel.start()
    with k.connect() as conn:
        a = conn.proc.spawn(agent("keeper"), argv=["crash-once"], name="phoenix",
                            restart="on-failure")
        assert wait_until(lambda: conn.proc.info(a).state == "restarting", 30)
        with pytest.raises(sdk.Busy):
            conn.proc.spawn(agent("keeper"), argv=["read"], name="phoenix")
        info = conn.proc.wait(a, timeout=60)
        assert info.restarts == 1 and info.exit_status == 0 and info.result == KEPT, info
    k.stop(signal.SIGTERM)
    k.start()
    with k.connect() as conn:
        said = parent(conn, [keeper("overwrite", "phoenix")], name="after-reboot")
        assert said == ["EPERM"], said
        assert conn.fs.read("notes.txt", owner="phoenix").decode() == NOTE


def test_the_migration_gives_past_names_to_their_last_spawner(tmp_path: Path) -> None:
    path = tmp_path / "kernel.db"
    old = sqlite3.connect(path, isolation_level=None)
    for script in SCHEMA[:4]:
        old.executescript(script)
    old.execute("PRAGMA user_version=4")
    for name, by in (("bob", "user:0"), ("bob", "agent:1"), ("ann", "user:1000")):
        old.execute("INSERT INTO agents (name, path, argv, caps, spawned_by, state) "
                    "VALUES (?, '/a.py', '[]', '[]', ?, 'exited')", (name, by))
    old.close()
    db = Database(path)
    assert sorted(db.read("SELECT name, owner, agent_id FROM names")) == [
        ("ann", "user:1000", 3), ("bob", "agent:1", 2)]
