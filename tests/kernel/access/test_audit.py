"""The audit chain's verification: full and quick (from the checkpoint), in slices, and through
a kernel whose loop keeps answering while a long chain is checked."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from kernel.access.audit import AuditLog, Verification
from kernel.db import Database


def _log(root: Path, rows: int = 0) -> AuditLog:
    db = Database(root / "kernel.db")
    db.conn.execute("PRAGMA synchronous=OFF")
    log = AuditLog(db, root / "audit.head", root / "audit.verified")
    _append(log, rows)
    return log


def _append(log: AuditLog, rows: int, start: int = 0) -> None:
    for i in range(start, start + rows):
        log.append("kernel", "test", n=i)
    log.db.commit()
    log.anchor()


def _edit(root: Path, sql: str) -> None:
    """Tamper with the database from outside, as someone with the file would."""
    conn = sqlite3.connect(root / "kernel.db")
    conn.execute(sql)
    conn.commit()
    conn.close()


def test_a_full_verify_leaves_a_checkpoint_that_a_quick_one_starts_from(tmp_path: Path) -> None:
    log = _log(tmp_path, 50)
    assert log.checkpoint() is None
    assert log.verify(full=True) is None
    seq, digest = log.checkpoint()
    assert seq == 50 and digest == log.db.read("SELECT hash FROM audit WHERE seq=50")[0][0]
    _append(log, 30, start=50)
    quick = Verification(log, full=False)
    assert quick.step(1 << 20) and quick.broken is None
    assert quick.checked == 30  # only the rows added since
    assert log.checkpoint()[0] == 80


def test_quick_verify_catches_tampering_after_the_checkpoint(tmp_path: Path) -> None:
    log = _log(tmp_path, 20)
    assert log.verify() is None
    _append(log, 10, start=20)
    _edit(tmp_path, "UPDATE audit SET detail='{}' WHERE seq=25")
    assert log.verify(full=False) == 25
    assert log.verify(full=True) == 25


def test_quick_verify_is_blind_before_the_checkpoint_but_full_is_not(tmp_path: Path) -> None:
    log = _log(tmp_path, 20)
    assert log.verify() is None
    _edit(tmp_path, "UPDATE audit SET detail='{}' WHERE seq=7")
    assert log.verify(full=False) is None  # documented: the checkpoint vouches for rows 1..20
    assert log.verify(full=True) == 7


@pytest.mark.parametrize("sql", ["UPDATE audit SET hash='ab' || substr(hash, 3) WHERE seq=20",
                                 "UPDATE audit SET detail='{}' WHERE seq=20",
                                 "DELETE FROM audit WHERE seq >= 20"])
def test_a_changed_checkpoint_row_is_reported(tmp_path: Path, sql: str) -> None:
    log = _log(tmp_path, 20)
    assert log.verify() is None
    _append(log, 5, start=20)
    _edit(tmp_path, sql)
    assert log.verify(full=False) == 20


def test_quick_without_a_checkpoint_is_full(tmp_path: Path) -> None:
    log = _log(tmp_path, 10)
    _edit(tmp_path, "UPDATE audit SET detail='{}' WHERE seq=3")
    assert log.verify(full=False) == 3
    (tmp_path / "audit.verified").write_text("garbage\n")
    assert log.verify(full=False) == 3


def test_truncation_after_the_checkpoint_is_caught_by_the_anchor(tmp_path: Path) -> None:
    log = _log(tmp_path, 10)
    assert log.verify() is None
    _append(log, 10, start=10)
    _edit(tmp_path, "DELETE FROM audit WHERE seq > 15")
    log.reload()  # as a restarted kernel would read the head
    assert log.verify(full=False) == 16


def test_slices_give_the_same_answer_as_one_go(tmp_path: Path) -> None:
    log = _log(tmp_path, 95)
    check = Verification(log, full=True)
    steps = 1
    while not check.step(10):
        steps += 1
    assert steps == 10 and check.broken is None and check.checked == 95
    _edit(tmp_path, "UPDATE audit SET event='other' WHERE seq=42")
    check = Verification(log, full=True)
    while not check.step(10):
        pass
    assert check.broken == 42


def test_a_reload_between_slices_starts_the_check_over(tmp_path: Path) -> None:
    log = _log(tmp_path, 40)
    check = Verification(log, full=True)
    assert not check.step(10)
    # A batch rolled back and rows rewritten: what the check read may be gone.
    log.db.conn.execute("DELETE FROM audit WHERE seq > 5")
    log.db.commit()
    log.reload()
    _append(log, 10, start=100)
    while not check.step(10):
        pass
    assert check.broken is None and log.checkpoint()[0] == 15


def test_the_loop_answers_a_neighbour_while_a_long_chain_is_verified(fresh_kernel) -> None:
    """A full verify of 150,000 rows keeps the loop about a second; done in slices, a
    neighbour's calls are answered all along (old code, in one go: none in the middle of it).
    Counted in the middle 60% of the verify's time, so calls made before it reached the kernel
    or answered with it do not count."""
    fresh_kernel.start()
    fresh_kernel.stop()
    log = AuditLog(Database(fresh_kernel.state_dir / "kernel.db"),
                   fresh_kernel.state_dir / "audit.head")
    log.db.conn.execute("PRAGMA synchronous=OFF")
    _append(log, 150_000)
    log.db.close()
    fresh_kernel.start()
    span: list[float] = []
    report = None

    def verify() -> None:
        nonlocal report
        with fresh_kernel.connect(timeout=120) as admin:
            span.append(time.monotonic())
            report = admin.audit.verify(full=True)
            span.append(time.monotonic())

    answered: list[float] = []
    with fresh_kernel.connect() as neighbour:
        worker = threading.Thread(target=verify)
        worker.start()
        while len(span) < 2:
            neighbour.sys.null()
            answered.append(time.monotonic())
        worker.join()
    assert report is not None and report.intact and report.rows >= 150_000
    start, end = span
    middle = [t for t in answered if start + 0.2 * (end - start) < t < end - 0.2 * (end - start)]
    assert len(middle) >= 10, (len(middle), end - start)


# --- the anchor file: two checksummed slots ---------------------------------------------------


def test_the_anchor_alternates_slots_and_a_torn_slot_leaves_the_other(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    _append(log, 2, start=3)
    _append(log, 2, start=5)
    head = tmp_path / "audit.head"
    data = head.read_bytes()
    assert len(data) == 256 and log.anchored()[0] == 7
    newest = 0 if data[:128].split()[1] == b"7" else 1
    assert data[(1 - newest) * 128:].split()[1] == b"5"  # the batch before, in the other slot
    torn = bytearray(data)
    torn[newest * 128 + 20:newest * 128 + 40] = b"\0" * 20  # a write cut short
    head.write_bytes(bytes(torn))
    assert log.anchored() == (5, log.db.read("SELECT hash FROM audit WHERE seq=5")[0][0])
    assert log.verify() is None  # one batch behind verifies, as after a crash
    head.write_bytes(b"\0" * 256)
    assert log.anchored() == (-1, "unreadable") and log.verify() is not None


def test_an_anchor_of_the_one_line_form_still_reads(tmp_path: Path) -> None:
    log = _log(tmp_path, 4)
    digest = log.db.read("SELECT hash FROM audit WHERE seq=4")[0][0]
    (tmp_path / "audit.head").write_text(f"4 {digest}\n")
    assert log.anchored() == (4, digest) and log.verify() is None


def test_an_anchor_file_removed_or_replaced_is_written_again(tmp_path: Path) -> None:
    log = _log(tmp_path, 2)
    (tmp_path / "audit.head").unlink()
    _append(log, 1, start=2)
    assert log.anchored()[0] == 3
    (tmp_path / "audit.head").write_text("junk")  # another inode at the path
    _append(log, 1, start=3)
    assert log.anchored()[0] == 4 and log.verify() is None
