"""tools/bench/revs.py: the RESULT line is read as numbers, and a run without a benchmark or
with an unknown commit is refused with a reason, before any worktree is made."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools" / "bench"))
import revs


def test_the_last_result_line_is_read_as_numbers() -> None:
    out = ("RESULT old=1\nsome table\n"
           "RESULT ring_p50_us=18.9 speedup=11.2x overhead_pct=1.5% rev=abc\n")
    assert revs.result_of(out) == {"ring_p50_us": 18.9, "speedup": 11.2, "overhead_pct": 1.5}
    assert revs.result_of("no result here\n") == {}


def _revs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "revs.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_run_without_a_benchmark_or_with_no_such_commit_is_refused() -> None:
    out = _revs("HEAD")
    assert out.returncode == 2 and "revs.py REV" in out.stderr
    out = _revs("HEAD", "--")
    assert out.returncode == 2 and "name a benchmark" in out.stderr
    out = _revs("no-such-commit-xyz", "--", "syscall.py")
    assert out.returncode == 2 and "no commit 'no-such-commit-xyz'" in out.stderr
    listed = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    assert "revs-" not in listed
