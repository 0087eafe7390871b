"""tools/bench/quality.py's agent: the reference Reflexion agent (userland/agents/reflexion.py,
copied beside this file by the harness), waiting for "go" and recording each model call.

Argv: reflexion.py's own. Returns {"calls": [...], "answer", "passed", "end"}.
"""

from __future__ import annotations

import sys
from typing import Any

from recorder import run_recorded  # beside this file; the runner puts it on sys.path
from reflexion import Reflexion, options


class BenchReflexion(Reflexion):
    def run(self, task: str) -> dict[str, Any]:
        return run_recorded(self, options(sys.argv[1:]), ("answer", "passed"))
