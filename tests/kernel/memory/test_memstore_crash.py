"""Crash safety of the memory and storage managers: a writer is SIGKILLed at random points many
times; after each kill the database passes `PRAGMA integrity_check`, every acknowledged write is
there, and nothing half-written is visible (every version's blob exists and matches its hash,
the keyword index agrees with its table)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import sdk
from kernel.access.audit import AuditLog
from kernel.config import Config
from kernel.db import Database
from kernel.memory.manager import MemoryManager
from kernel.state import StateDir
from kernel.storage.manager import StorageManager
from kernel.switchboard import Switchboard
from tests.conftest import KernelProcess, wait_until

ROUNDS = 25


def _managers(config: Config) -> SimpleNamespace:
    """The memory and storage managers on the state dir's real database, started; what they
    need of the rest of the kernel (access, approvals, the process table) no path here uses."""
    state = StateDir(config.state_dir)
    state.open()
    db = Database(state.db_path)
    audit = AuditLog(db)
    calls = Switchboard(config.agent_calls_in_flight, config.user_calls_in_flight)
    memory = MemoryManager(calls=calls, config=config, db=db, state=state)
    storage = StorageManager(access=None, approvals=None, audit=audit, calls=calls,
                             config=config, db=db, memory=memory, procs=None, state=state)
    memory.start()
    storage.start()
    return SimpleNamespace(state=state, db=db, memory=memory, storage=storage)


def _writer(state: Path, ack_fd: int, seed: int) -> None:
    """The managers on a real database, committing like the kernel's loop (a batch of calls,
    commit, then acknowledge), until killed. No kernel: each manager is given what it uses."""
    config = Config(state_dir=state, memory_embedder="hash", fs_versions_kept=10_000,
                    fs_quota=1 << 40, memory_quota=1 << 40)
    k = _managers(config)
    k.db.commit()
    rng = random.Random(seed)
    n = 0
    while True:
        acks = []
        for _ in range(rng.randint(1, 4)):
            n += 1
            kind = rng.random()
            if kind < 0.6:
                data = rng.randbytes(rng.choice([10, 1000, 50_000]))
                path = f"d{rng.randrange(3)}/f{rng.randrange(8)}"
                op = k.storage.write if kind < 0.45 else k.storage.append
                stat = op("crash", path, data)
                acks.append(["fs", path, stat.version, stat.sha256])
            else:
                content = f"memory {seed}-{n} " + "z" * rng.randrange(2000)
                memory_id = k.memory.add(None, "crash/ns", content, {"n": n})
                acks.append(["mem", memory_id, hashlib.sha256(content.encode()).hexdigest()])
        k.db.commit()  # the loop's flush: commit, then reply
        for ack in acks:
            os.write(ack_fd, (json.dumps(ack) + "\n").encode())


def _check(state: Path, acked: list[list]) -> None:
    db = sqlite3.connect(state / "kernel.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.execute("INSERT INTO memories_fts(memories_fts) VALUES('integrity-check')")
        for ack in acked:
            if ack[0] == "fs":
                _, path, version, digest = ack
                row = db.execute("SELECT blob FROM fs_versions WHERE owner='crash' AND path=? "
                                 "AND version=?", (path, version)).fetchone()
                assert row == (digest,), f"acknowledged {path} v{version} lost"
            else:
                _, memory_id, digest = ack
                row = db.execute("SELECT content FROM memories WHERE id=?",
                                 (memory_id,)).fetchone()
                assert row is not None, f"acknowledged memory {memory_id} lost"
                assert hashlib.sha256(row[0].encode()).hexdigest() == digest
        # Nothing half-written: every committed version's bytes are whole; every head exists.
        for (digest,) in db.execute("SELECT DISTINCT blob FROM fs_versions"):
            blob = state / "blobs" / digest[:2] / digest
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
        assert db.execute("SELECT COUNT(*) FROM fs_files f WHERE kind='file' AND NOT EXISTS "
                          "(SELECT 1 FROM fs_versions v WHERE v.owner=f.owner AND "
                          "v.path=f.path AND v.version=f.head)").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM memories WHERE embedding IS NOT NULL AND "
                          "length(embedding) != 384 * 4").fetchone()[0] == 0
    finally:
        db.close()


def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rng = random.Random(1234)
    acked: list[list] = []
    for round_ in range(ROUNDS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(read_fd)
            try:
                _writer(state, write_fd, round_)
            finally:
                os._exit(1)
        os.close(write_fd)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd, "rb") as pipe:
            lines = pipe.read().decode().splitlines()
        acked += [json.loads(line) for line in lines]
        _check(state, acked)
    assert len(acked) > ROUNDS  # the kills landed mid-stream, not before the first commit
    # Recovery collects what the kills left behind: temporaries and blobs no version names.
    k = _managers(Config(state_dir=state, memory_embedder="hash"))
    try:
        named = {r[0] for r in k.db.read("SELECT DISTINCT blob FROM fs_versions")}
        assert k.storage.blobs.all() == named
        assert not list((state / "blobs").glob("??/.tmp-*"))
    finally:
        k.memory.stop()
        k.db.close()
        k.state.close()


def test_kernel_sigkill_keeps_acknowledged_files_and_memories(tmp_path: Path) -> None:
    """The same through the real kernel process and the SDK."""
    config = tmp_path / "kernel.toml"
    config.write_text('[kernel]\nmemory_embedder = "hash"\n')
    k = KernelProcess(tmp_path / "state")
    k.extra_args = ["--config", str(config)]
    acked: list[tuple[str, object, bytes]] = []
    tried: dict[str, list[bytes]] = {}  # every write attempted per path, acknowledged or not
    refused: list[sdk.SyscallError] = []  # errors other than the kill's
    rng = random.Random(0)
    for round_ in range(3):
        k.start()
        stop = threading.Event()

        def write(round_: int = round_, stop: threading.Event = stop) -> None:
            with k.connect(timeout=5) as c:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    data = f"{round_}-{i}".encode() * 50
                    tried.setdefault(f"r{round_}/f{i % 5}", []).append(data)
                    try:
                        c.fs.write(f"r{round_}/f{i % 5}", data, owner="kill")
                        acked.append(("fs", f"r{round_}/f{i % 5}", data))
                        memory_id = c.memory.add(data.decode(), namespace="kill/ns")
                        acked.append(("mem", memory_id, data))
                    except (sdk.TimedOut, sdk.KernelUnavailable):
                        return  # the kill cut this call off
                    except sdk.SyscallError as exc:
                        refused.append(exc)
                        return

        thread = threading.Thread(target=write)
        thread.start()
        before = len(acked)
        # Until a few writes were acknowledged (a loaded machine may be slow to start), then
        # a while longer, so the kill lands at a different point in each round.
        assert wait_until(lambda before=before: refused or len(acked) >= before + 4,
                          timeout=30)
        assert not refused, refused
        time.sleep(rng.uniform(0.1, 0.5))
        k.stop(signal.SIGKILL)
        stop.set()
        thread.join()
        assert not refused, refused
    k.start()
    try:
        with k.connect() as c:
            latest = {path: data for kind, path, data in acked if kind == "fs"}
            for path, data in latest.items():
                # The last acknowledged write, or one the kill cut off after it committed.
                later = tried[path][tried[path].index(data):]
                assert c.fs.read(path, owner="kill") in later
            for kind, memory_id, data in acked:
                if kind == "mem":
                    assert c.memory.get(memory_id, namespace="kill/ns").content == data.decode()
    finally:
        k.stop()
    _check(tmp_path / "state", [])
