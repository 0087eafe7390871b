"""`python -m kernel` whose `hash-slow` embedder can be slowed and its thread killed, for
tests/kernel/test_chaos_faults.py. Fault injection only; everything else is the real kernel.

Flag files in $AGENTOS_FAULTS (a directory the test owns):
- `slow`: each embed call takes about 3 s (so a kill lands mid-call);
- `kill`: a watcher thread removes it and raises SystemExit inside the thread named `embedder`
  (`PyThreadState_SetAsyncExc`), the closest a Python thread comes to kill -9.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

import numpy as np

from kernel.boot import exit_now, main
from kernel.memory import manager
from kernel.memory.embed import HashEmbedder

FAULTS = Path(os.environ["AGENTOS_FAULTS"])


class SlowableEmbedder(HashEmbedder):
    def embed(self, texts: list[str]) -> np.ndarray:
        if (FAULTS / "slow").exists():
            for _ in range(300):  # short sleeps: an injected exception lands between them
                time.sleep(0.01)
        return super().embed(texts)


def _killer() -> None:
    while True:
        time.sleep(0.02)
        flag = FAULTS / "kill"
        if not flag.exists():
            continue
        flag.unlink()
        for thread in threading.enumerate():
            if thread.name == "embedder" and thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(SystemExit))
        (FAULTS / "killed").touch()


_make = manager.make_embedder
manager.make_embedder = lambda name: SlowableEmbedder(slow=True) if name == "hash-slow" else \
    _make(name)
threading.Thread(target=_killer, name="fault-killer", daemon=True).start()
exit_now(main())  # as `python -m kernel` ends
