"""One output convention: --json is one line and documented, info shows human times, and
--state-dir works after the subcommand too."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, KernelProcess, agent


def test_state_dir_after_the_subcommand_and_human_info(kernel: KernelProcess) -> None:
    ran = kernel.cli("run", "--wait", agent("exits"), "--", "0")
    assert ran.returncode == 0
    out = subprocess.run([sys.executable, "-m", "userland.cli", "ps", "-a", "--json",
                          "--state-dir", str(kernel.state_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1 and isinstance(json.loads(out.stdout), list)
    agent_id = str(json.loads(out.stdout)[-1]["id"])
    info = kernel.cli("info", agent_id).stdout
    started = next(line for line in info.splitlines() if line.startswith("started_at: "))
    assert started.count(":") == 3 and "-" in started  # started_at: 2026-12-06 14:07:28
    assert kernel.cli("info", "--json", agent_id).stdout.count("\n") == 1


def test_every_json_flag_has_help(kernel: KernelProcess) -> None:
    for command in (["ps"], ["info"], ["wait"], ["stats"], ["caps", "list"], ["tool", "list"],
                    ["token", "mint"]):
        assert "one JSON value" in kernel.cli(*command, "--help").stdout, command
