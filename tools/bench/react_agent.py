"""tools/bench/agents.py's agent: the reference ReAct agent (userland/agents/react.py, copied
beside this file by the harness: a strict-tier agent reads only its own directory), waiting for
"go" and recording each of its model calls.

Argv: react.py's own (`--steps N --max-tokens N TASK…`). Returns {"calls": [...], "answer",
"steps", "end"}: per call the prompt's digest (to match it with the direct baseline's), the
text, its tokens, latency, time queued in the kernel and time to first token.
"""

from __future__ import annotations

import sys
from typing import Any

from react import ReAct, options  # beside this file; the runner puts it on sys.path
from recorder import run_recorded  # the recorder the harness's in-process systems use


class BenchReAct(ReAct):
    def run(self, task: str) -> dict[str, Any]:
        return run_recorded(self, options(sys.argv[1:]), ("answer", "steps"))
