"""tools/bench/quality.py's agent: the reference Reflexion agent (userland/agents/reflexion.py,
copied beside this file by the harness), waiting for "go" and recording each model call.

Argv: reflexion.py's own. Returns {"calls": [...], "answer", "passed", "end"}.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from recorder import Recorded  # beside this file; the runner puts it on sys.path
from reflexion import Reflexion, options


class BenchReflexion(Reflexion):
    def run(self, task: str) -> dict[str, Any]:
        opts = options(sys.argv[1:])
        self.ipc.recv()  # the start signal: every agent begins together
        recorder = Recorded(self.llm.chat)
        self.llm = recorder  # Reflexion calls self.llm.chat(...) only
        out = self.solve(" ".join(opts.task), opts)
        return {"calls": recorder.calls, "answer": out["answer"], "passed": out["passed"],
                "end": time.time()}
