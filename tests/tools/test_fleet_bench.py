"""tools/bench/fleet.py end to end at a tiny N: two agentos kernels serving the tiny random model
as replicas, a front kernel whose models are fleets of them; the three tables come out and a
replica killed mid-run loses no call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_fleet_bench_runs_its_three_parts_at_a_tiny_n(tiny_dir: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools/bench/fleet.py"), "--agents", "2",
                          "--turns", "2", "--max-tokens", "8", "--model", str(tiny_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for part in ("1. overhead", "2. affinity", "3. failover", "straight at replica 0",
                 "through front (one)", "affinity off (spread)", "affinity on (pair)"):
        assert part in out.stdout, out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT overhead_pct=") and " affinity_gain=" in last, last
    assert last.endswith(" failover_lost=0"), out.stdout
    # Both affinity runs went through both replicas' figures: served counts a/b, 4 calls each.
    for line in out.stdout.splitlines():
        if line.strip().startswith("affinity o"):
            served = line.split()[-2]
            assert sum(int(x) for x in served.split("/")) == 4, line
