"""Crash-only at scale: the chaos harness (tools/chaos.py) SIGKILLs a real kernel at random
moments while clients and agents write, and checks nothing acknowledged is lost and nothing
leaks across cycles. Longer runs: `python -m tools.chaos --cycles 1000`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel.state import StateDir
from tests.conftest import TEST_TIER
from tools.chaos import Chaos

CYCLES = int(os.environ.get("AGENTOS_CHAOS_CYCLES", "10"))


@pytest.mark.timeout(600)
def test_kill_9_cycles_lose_nothing_acknowledged_and_leak_nothing(tmp_path: Path) -> None:
    chaos = Chaos(tmp_path / "state", seed=24, tier=TEST_TIER, log=lambda line: None)
    report = chaos.run(CYCLES)
    figures = report.figures()
    assert figures["cycles"] == CYCLES and figures["lost"] == 0
    # The kills landed mid-stream, on every kind of write.
    assert all(report.acked[kind] > CYCLES for kind in ("memories", "files", "messages"))
    assert report.acked["tokens"] and report.acked["revoked"]
    print(figures)


def test_temporaries_of_a_killed_kernel_are_swept_at_start(tmp_path: Path) -> None:
    """A kernel killed inside `write_private` (the audit anchor, the admin token) leaves its
    temporary; the next kernel on the directory removes it, and nothing else."""
    state = StateDir(tmp_path / "state")
    state.open()
    state.close()
    left = [state.root / ".audit.head.0badc0de.tmp", state.run / ".admin.token.12345678.tmp"]
    for path in left:
        path.write_bytes(b"half")
    kept = state.root / ".audit.head.tmp-not-ours"
    kept.write_bytes(b"x")
    state = StateDir(tmp_path / "state")
    state.open()
    try:
        assert not any(path.exists() for path in left)
        assert kept.exists() and (state.root / "kernel.lock").exists()
    finally:
        state.close()
