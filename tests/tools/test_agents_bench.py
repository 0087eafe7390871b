"""tools/bench/agents.py end to end at a tiny N: three ReAct agents of one step on the tiny
random model, directly and through a booted kernel (sandboxed agent processes); the report has
every system's figures, RQ1 is a fraction of the calls matched by prompt, and the speedup is
computed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools" / "bench"))
import revs

# By path: `agents` is also the OpenAI Agents SDK's package name.
_spec = importlib.util.spec_from_file_location("bench_agents", ROOT / "tools/bench/agents.py")
agents = sys.modules["bench_agents"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agents)


def test_the_harness_reports_every_system_and_rq1_at_a_tiny_n(tiny_dir: Path,
                                                               tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, str(ROOT / "tools/bench/agents.py"), "--agents", "3",
                          "--steps", "1", "--max-tokens", "8", "--policies", "fair",
                          "--model", str(tiny_dir), "--json", str(report)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT n=3 ") and "ratio_vs_vllm=n/a" in last, out.stdout
    result = revs.result_of(out.stdout)
    assert result["speedup_vs_direct"] > 0 and 0.0 <= result["identical"] <= 1.0
    assert "vllm: n/a" in out.stdout
    systems = {s["system"]: s for s in json.loads(report.read_text())["runs"]["3"]["systems"]}
    assert set(systems) == {"direct", "agentos/fair"}
    for s in systems.values():
        # One model call per agent, every agent done, the figures all there.
        assert (s["finished"], s["failed"], s["calls"]) == (3, 0, 3), s
        assert s["makespan_s"] > 0 and s["tokens_per_s"] > 0 and s["calls_per_s"] > 0
        assert s["completion_p50_s"] <= s["completion_p99_s"] <= s["makespan_s"] + 1
        assert 1 / 3 <= s["jain"] <= 1.0 and s["wait_mean_s"] >= 0
    # Every agent's one prompt is the same with and without the kernel, so all three match.
    assert systems["agentos/fair"]["matched_calls"] == 3
    assert abs(systems["agentos/fair"]["identical"] - result["identical"]) < 1e-3
    # Both sides computed in the one dtype the harness resolved (greedy texts can match).
    assert "dtype float32" in out.stdout or "dtype bfloat16" in out.stdout
    assert systems["direct"]["identical"] is None


def test_tasks_are_fixed_by_the_seed_and_jain_spans_one_to_one_over_n() -> None:
    assert agents.tasks(5, 22) == agents.tasks(5, 22) != agents.tasks(5, 23)
    assert len(set(agents.tasks(50, 22))) > 40
    assert agents.jain([2.0, 2.0, 2.0]) == 1.0
    assert abs(agents.jain([1.0, 0.0, 0.0, 0.0]) - 0.25) < 1e-9
