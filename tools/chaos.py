"""Crash-only chaos: SIGKILL a kernel at random moments while outside clients and agents write,
restart it, and check that nothing acknowledged was lost, nothing unacknowledged is half there,
revocations hold, the audit chain verifies, restart policies bring the agents back and nothing
leaks from one cycle to the next.

    .venv/bin/python -m tools.chaos --cycles 1000 [--minutes M] [--state-dir DIR] [--seed N]

Each cycle: boot `python -m kernel` on the same state directory (the time until `sys.null`
answers is the cycle's recovery time), check what the previous kernel acknowledged, let four
clients (memories, files over rings, mailbox messages, token mints and revocations) and two
writer agents (restart=always) run at full speed for a random 0.2-1.2 s, SIGKILL the kernel,
and check the database offline. The figures (cycles, acknowledged writes, lost, recovery
p50/p99, leak counts) are printed as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

import sdk
from kernel.proc import homes

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "tools" / "chaos_agent.py"
IDLE = ROOT / "tests" / "agents" / "idle.py"
WRITERS = 2
SINK = "chaos-sink"
CONFIG = """[kernel]
memory_embedder = "hash"
fs_versions_kept = 1000000
fs_quota = 1099511627776
memory_quota = 1099511627776
"""


# SQLite's checks read the whole database, which grows by about 1.5 MB a cycle: run every cycle,
# they made a long run quadratic (10 s a cycle by cycle 550). A corrupt page stays corrupt, so
# a check every few cycles finds what one every cycle would, a little later.
QUICK_EVERY = 10  # cycles between PRAGMA quick_checks
WHOLE_EVERY = 100  # cycles between checks of the whole state (and one at the end)


class ChaosFailure(AssertionError):
    """An invariant the chaos run broke; the message says which and where."""


@dataclass
class Acks:
    """Everything a kernel acknowledged, by kind, as the checks need it."""

    memories: list[tuple[int, str]] = field(default_factory=list)  # id, sha256 of content
    files: list[tuple[str, str, int, str]] = field(default_factory=list)  # owner, path, v, sha
    messages: list[str] = field(default_factory=list)  # sha256 of the payload
    tokens: list[tuple[str, str]] = field(default_factory=list)  # live: id, token
    revoked: list[tuple[str, str]] = field(default_factory=list)  # id, token

    def count(self) -> int:
        return (len(self.memories) + len(self.files) + len(self.messages) + len(self.tokens)
                + len(self.revoked))


@dataclass
class Report:
    cycles: int = 0
    acked: Counter = field(default_factory=Counter)
    lost: int = 0
    recovery_s: list[float] = field(default_factory=list)
    reconcile_s: list[float] = field(default_factory=list)
    leaks: dict[str, list[int]] = field(default_factory=dict)  # what -> count after each cycle
    audit_rows: int = 0  # rows of the audit chain verified whole at the end

    def figures(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return {"cycles": self.cycles, "acknowledged": sum(self.acked.values()),
                "by_kind": dict(self.acked), "lost": self.lost,
                "recovery_ms_p50": pct(self.recovery_s, 0.5),
                "recovery_ms_p99": pct(self.recovery_s, 0.99),
                "reconcile_ms_p50": pct(self.reconcile_s, 0.5),
                "reconcile_ms_p99": pct(self.reconcile_s, 0.99),
                "leaks_max": {k: max(v) for k, v in self.leaks.items()},
                "audit_rows": self.audit_rows}


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class Chaos:
    def __init__(self, state: Path, seed: int = 0, tier: str | None = None,
                 min_s: float = 0.2, max_s: float = 1.2, log=print) -> None:
        self.state = state
        self.rng = random.Random(seed)
        self.tier = tier
        self.min_s, self.max_s = min_s, max_s
        self.log = log
        self.report = Report()
        self.acks = Acks()
        self.ack_dir = state.parent / f"{state.name}-acks"
        self.config = state.parent / f"{state.name}-kernel.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.booted_at = 0.0
        self.agent_ids: list[int] = []  # the writers, then the sink
        self._lock = threading.Lock()

    # --- the kernel -------------------------------------------------------------------------

    def boot(self) -> float:
        """Start the kernel; seconds until it answers."""
        self.state.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONFIG)
        flags = ["--config", str(self.config), "--log-format", "text"]
        if self.tier:
            flags += ["--sandbox", self.tier]
        with open(self.state.parent / f"{self.state.name}.log", "ab") as log:
            started, self.booted_at = time.monotonic(), time.time()
            # PYTHONFAULTHANDLER: a kernel that does not answer is aborted with its stacks
            # written to the log, as systemd's watchdog does to the service.
            self.proc = subprocess.Popen([sys.executable, "-m", "kernel", "--state-dir",
                                          str(self.state), *flags], stdout=log, stderr=log,
                                         cwd=ROOT, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        while True:
            if self.proc.poll() is not None:
                raise ChaosFailure(f"kernel exited {self.proc.returncode} at boot; its log "
                                   f"ends:\n{self.log_tail()}")
            try:
                with sdk.connect(state_dir=self.state, timeout=1.0) as conn:
                    conn.sys.null()
                return time.monotonic() - started
            except sdk.SyscallError:
                if time.monotonic() - started > 60:
                    self.proc.send_signal(signal.SIGABRT)
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        pass
                    raise ChaosFailure("kernel not answering 60 s after boot; aborted, its log "
                                       f"ends:\n{self.log_tail(80)}") from None
                time.sleep(0.01)

    def log_tail(self, lines: int = 20) -> str:
        path = self.state.parent / f"{self.state.name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    # --- the writers ------------------------------------------------------------------------

    def spawn_agents(self) -> None:
        """The writer agents and the mailbox's receiver, once: later kernels restart them."""
        self.ack_dir.mkdir(exist_ok=True)
        with sdk.connect(state_dir=self.state) as conn:
            for i in range(WRITERS):
                self.agent_ids.append(conn.proc.spawn(
                    str(AGENT), name=f"chaos-w{i}", argv=[str(self.ack_dir / f"w{i}")],
                    sandbox="none", restart="always"))
            self.agent_ids.append(conn.proc.spawn(str(IDLE), name=SINK, restart="always"))

    def _client(self, kind: str, stop: threading.Event, cycle: int) -> None:
        rng = random.Random(f"{kind}-{cycle}")
        try:
            with sdk.connect(state_dir=self.state, timeout=2.0, rings=kind == "files") as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    self._write(conn, kind, cycle, n, rng)
        except sdk.SyscallError:
            pass  # the kernel died under the call: it was not acknowledged

    def _write(self, conn: sdk.Connection, kind: str, cycle: int, n: int,
               rng: random.Random) -> None:
        payload = f"{kind} {cycle} {n} " + "x" * rng.choice((1, 100, 4000))
        if kind == "memories":
            memory_id = conn.memory.add(payload, {"cycle": cycle}, namespace="chaos/c")
            with self._lock:
                self.acks.memories.append((memory_id, _sha(payload)))
        elif kind == "files":
            path = f"c/f{n % 7}"
            stat = conn.fs.write(path, payload * rng.choice((1, 30)), owner="chaos")
            with self._lock:
                self.acks.files.append(("chaos", path, stat.version, stat.sha256))
        elif kind == "messages":
            try:
                conn.ipc.send(SINK, {"payload": payload, "sha": _sha(payload)})
            except sdk.SyscallError as exc:
                if exc.code not in (sdk.ErrorCode.ENOENT, sdk.ErrorCode.EAGAIN):
                    raise  # the sink between its death and its restart, or a full mailbox
                time.sleep(0.01)
                return
            with self._lock:
                self.acks.messages.append(_sha(payload))
        else:  # tokens: mint, and revoke every third one
            grant = conn.caps.delegate("user:0", ["memory.list@mem/chaos/c"], ttl=86400)
            if n % 3:
                with self._lock:
                    self.acks.tokens.append((grant.id, grant.token))
                return
            conn.caps.revoke(grant.id)
            with self._lock:
                self.acks.revoked.append((grant.id, grant.token))

    def _agent_acks(self, offsets: dict[str, int]) -> None:
        """What the writer agents logged since the last look."""
        for i in range(WRITERS):
            log = self.ack_dir / f"w{i}"
            if not log.exists():
                continue
            with open(log, "rb") as f:
                f.seek(offsets.get(log.name, 0))
                data = f.read()
            whole = data[:data.rfind(b"\n") + 1]
            offsets[log.name] = offsets.get(log.name, 0) + len(whole)
            for line in whole.decode().splitlines():
                kind, *rest = line.split()
                if kind == "mem":
                    self.acks.memories.append((int(rest[0]), rest[1]))
                else:
                    self.acks.files.append((f"chaos-w{i}", rest[0], int(rest[1]), rest[2]))

    # --- the checks -------------------------------------------------------------------------

    def check_offline(self, new: Acks, whole: bool = False, quick: bool = True,
                      since: float = 0.0) -> None:
        """On the dead kernel's database: every acknowledged write there, nothing half there,
        the sink's messages all present (then consumed, as a reader would). Each cycle checks
        what that kernel could have half written — versions made since `since` (wall clock)
        and their blobs; `whole` checks everything: SQLite's and the full-text index's
        integrity and every blob any version names (every WHOLE_EVERY cycles and at the end:
        checking the whole state every cycle made a long run quadratic); `quick` runs SQLite's
        quick_check."""
        db = sqlite3.connect(self.state / "kernel.db", timeout=30)
        try:
            if whole:
                if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                    raise ChaosFailure("database integrity_check failed")
                db.execute("INSERT INTO memories_fts(memories_fts) VALUES('integrity-check')")
            elif quick and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise ChaosFailure("database quick_check failed")
            lost = []
            for memory_id, digest in new.memories:
                row = db.execute("SELECT content FROM memories WHERE id=?",
                                 (memory_id,)).fetchone()
                if row is None or _sha(row[0]) != digest:
                    lost.append(f"memory {memory_id}")
            for owner, path, version, digest in new.files:
                row = db.execute("SELECT blob FROM fs_versions WHERE owner=? AND path=? AND "
                                 "version=?", (owner, path, version)).fetchone()
                blob = self.state / "blobs" / digest[:2] / digest
                if row != (digest,) or not blob.exists() or _sha(blob.read_bytes()) != digest:
                    lost.append(f"file {owner}:{path} v{version}")
            present = Counter()
            for (data,) in db.execute("SELECT data FROM messages"):
                message = msgspec.msgpack.decode(data)
                if _sha(message["payload"]) != message["sha"]:
                    raise ChaosFailure("a half-written message in a mailbox")
                present[message["sha"]] += 1
            lost += [f"message {sha[:12]}" for sha in new.messages if not present[sha]]
            revoked = {row[0] for row in db.execute(
                "SELECT id FROM tokens WHERE revoked_at IS NOT NULL")}
            lost += [f"revocation {tid}" for tid, _ in new.revoked if tid not in revoked]
            # Nothing half there: every version's bytes whole, every file's head a version.
            for (digest,) in db.execute("SELECT DISTINCT blob FROM fs_versions WHERE "
                                        "created_at >= ?", (0.0 if whole else since,)):
                blob = self.state / "blobs" / digest[:2] / digest
                if not blob.exists() or _sha(blob.read_bytes()) != digest:
                    raise ChaosFailure(f"blob {digest[:12]} named by a version is not whole")
            if db.execute("SELECT COUNT(*) FROM fs_files f WHERE kind='file' AND NOT EXISTS "
                          "(SELECT 1 FROM fs_versions v WHERE v.owner=f.owner AND "
                          "v.path=f.path AND v.version=f.head)").fetchone()[0]:
                raise ChaosFailure("a file whose head version does not exist")
            db.execute("DELETE FROM messages")  # consumed: the next cycle checks its own
            db.commit()
        finally:
            db.close()
        if lost:
            self.report.lost += len(lost)
            raise ChaosFailure(f"acknowledged writes lost: {lost[:10]} ({len(lost)} in all)")

    def check_online(self, conn: sdk.Connection, new: Acks) -> float:
        """Through a new kernel: revoked tokens refused, live ones accepted, the audit chain
        intact, the restart=always agents running again; seconds until they all were."""
        started = time.monotonic()
        report = conn.audit.verify(full=False)  # the rows of this cycle; all at the end
        if not report.intact:
            raise ChaosFailure(f"audit chain broken at seq {report.broken_at}")
        for tid, token in self.rng.sample(new.revoked, min(5, len(new.revoked))):
            try:
                with sdk.connect(state_dir=self.state, token=token, timeout=5) as c:
                    c.memory.list(namespace="chaos/c", limit=1)
            except sdk.SyscallError as exc:
                if exc.code != sdk.ErrorCode.EPERM:
                    raise
            else:
                raise ChaosFailure(f"revoked token {tid} works after a restart")
        for _tid, token in self.rng.sample(new.tokens, min(5, len(new.tokens))):
            with sdk.connect(state_dir=self.state, token=token, timeout=5) as c:
                c.memory.list(namespace="chaos/c", limit=1)
        deadline = started + 30
        while True:
            states = {info.id: (info.state, info.pid) for info in conn.proc.ps()
                      if info.id in self.agent_ids}
            if all(states.get(a, ("", 0))[0] == "running" for a in self.agent_ids):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise ChaosFailure(f"agents not reconciled 30 s after boot: {states}")
            time.sleep(0.02)

    def count_leaks(self) -> dict[str, int]:
        """Things a cycle could leave behind, counted while the kernel and its agents run."""
        db = sqlite3.connect(f"file:{self.state / 'kernel.db'}?mode=ro", uri=True, timeout=30)
        try:
            live = {uid for (uid,) in db.execute(
                "SELECT uid FROM agents WHERE state IN ('starting','running','restarting') "
                "AND uid IS NOT NULL")}
            ended = {uid for (uid,) in db.execute(
                "SELECT uid FROM agents WHERE uid IS NOT NULL")} - live
        finally:
            db.close()
        uids = Counter()
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    uids[entry.stat().st_uid] += 1
                except FileNotFoundError:
                    pass
        sysv = 0
        for kind in ("shm", "sem", "msg"):
            path = Path("/proc/sysvipc") / kind
            if path.exists():
                for line in path.read_text().splitlines()[1:]:
                    fields = line.split()
                    sysv += int(fields[7 if kind == "shm" else 4 if kind == "sem" else 7]) in (
                        live | ended)
        state = str(self.state.resolve())
        mounts = sum(state in line for line in Path("/proc/self/mountinfo").read_text()
                     .splitlines())
        temps, sockets = self._walk_state()
        shm = sum(1 for name in os.listdir("/dev/shm") if name.startswith("agentos-")
                  and os.stat(f"/dev/shm/{name}").st_uid in live | ended)
        return {"agent_uids": len(live), "ended_uid_processes": sum(uids[u] for u in ended),
                "sysv": sysv, "mounts": mounts, "temp_files": temps, "sockets": sockets,
                "shm": shm, "kernel_processes": self._kernel_children()}

    def _walk_state(self) -> tuple[int, int]:
        """(temporary files a dead kernel left, older than this one; sockets) in the state
        dir, in one pass of scandir: its blobs grow by thousands of files a cycle, and two
        `rglob`s with a stat per file were three quarters of a cycle by cycle 300."""
        temps = sockets = 0
        todo = [str(self.state)]
        while todo:
            try:
                entries = list(os.scandir(todo.pop()))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    elif not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                        # DirEntry has no is_socket; the few entries left are stat'ed
                        sockets += stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
                    elif ".tmp" in entry.name:
                        temps += entry.stat(follow_symlinks=False).st_mtime < self.booted_at
                except FileNotFoundError:
                    pass
        return temps, sockets

    def _kernel_children(self) -> int:
        """Processes whose parent is the kernel (agents, tools, workers)."""
        assert self.proc is not None
        try:
            return len(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                       .read_text().split())
        except FileNotFoundError:
            return 0

    # --- the run ----------------------------------------------------------------------------

    def cycle(self, n: int, offsets: dict[str, int]) -> None:
        before = self.acks
        self.acks = Acks()
        started = time.time() - 1.0  # a margin for clock steps; versions after this are new
        self.report.recovery_s.append(self.boot())
        with sdk.connect(state_dir=self.state, timeout=10) as conn:
            if not self.agent_ids:
                self.spawn_agents()
            self.report.reconcile_s.append(self.check_online(conn, before))
        for what, count in self.count_leaks().items():
            self.report.leaks.setdefault(what, []).append(count)
        stop = threading.Event()
        clients = [threading.Thread(target=self._client, args=(kind, stop, n), daemon=True)
                   for kind in ("memories", "files", "messages", "tokens")]
        for thread in clients:
            thread.start()
        time.sleep(self.rng.uniform(self.min_s, self.max_s))
        self.kill()
        stop.set()
        for thread in clients:
            thread.join(10)
        self._agent_acks(offsets)
        self.check_offline(self.acks, whole=n % WHOLE_EVERY == 0, quick=n % QUICK_EVERY == 0,
                           since=started)
        for kind in ("memories", "files", "messages", "tokens", "revoked"):
            self.report.acked[kind] += len(getattr(self.acks, kind))
        # Keep what a later cycle re-checks online: the tokens and revocations.
        self.acks.tokens = before.tokens[-200:] + self.acks.tokens
        self.acks.revoked = before.revoked[-200:] + self.acks.revoked
        self.report.cycles = n

    def run(self, cycles: int, seconds: float | None = None) -> Report:
        """`cycles` cycles, or fewer if `seconds` run out first (then the final checks run on
        what was done: the report says how many cycles that was)."""
        offsets: dict[str, int] = {}
        end = None if seconds is None else time.monotonic() + seconds
        try:
            for n in range(1, cycles + 1):
                self.cycle(n, offsets)
                last = n == cycles or (end is not None and time.monotonic() >= end)
                if n % 10 == 0 or last:
                    self.log(json.dumps({"cycle": n, **self.report.figures()}))
                if last:
                    break
            self.check_offline(Acks(), whole=True)  # the last kernel's state, all of it
            self.boot()
            with sdk.connect(state_dir=self.state, timeout=600) as conn:
                self.check_online(conn, self.acks)
                whole = conn.audit.verify(full=True)  # every row, once, at the end
                if not whole.intact:
                    raise ChaosFailure(f"audit chain broken at seq {whole.broken_at}")
                self.report.audit_rows = whole.rows
            self.check_leaks()
        finally:
            self.stop()
        return self.report

    def check_leaks(self) -> None:
        """Counts that must not grow across cycles: the last equals the first's."""
        leaks = self.report.leaks
        for what in ("ended_uid_processes", "sysv", "shm"):
            if any(leaks[what]):
                raise ChaosFailure(f"{what} leaked: {leaks[what]}")
        for what in ("agent_uids", "mounts", "temp_files", "sockets", "kernel_processes"):
            if max(leaks[what]) > leaks[what][0] + (2 if what == "kernel_processes" else 0):
                raise ChaosFailure(f"{what} grew across cycles: {leaks[what]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float,
                        help="stop after the cycle that passes this much time (then check all)")
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--sandbox", help="the kernel's default tier (the sink runs in it)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        state = args.state_dir or Path(tmp) / "state"
        chaos = Chaos(state, seed=args.seed, tier=args.sandbox,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
        try:
            report = chaos.run(args.cycles, None if args.minutes is None else args.minutes * 60)
        finally:
            # A kernel that died for good (a failed run) left its agents' homes mounted.
            if (state / "agents").is_dir():
                homes.detach_stale(state / "agents")
        print(json.dumps(report.figures()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
