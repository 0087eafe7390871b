"""`python -m kernel` whose `sys.null` handler blocks the dispatch loop for good once the file
named by $AGENTOS_WEDGE exists (taking the file away, so the kernel that replaces this one
serves normally): a handler stuck in a blocking call, the bug a watchdog is for.
Only the one handler changes; the loop, its watchdog pings and every other thread are the
production ones (tests/kernel/test_watchdog.py)."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any

from kernel.syscalls import SYSCALLS

_null = SYSCALLS["sys.null"]


def _wedging_null(k: Any, call: Any, args: Any) -> Any:
    try:
        os.unlink(os.environ["AGENTOS_WEDGE"])
    except FileNotFoundError:
        pass
    else:
        print("wedging the dispatch loop", file=sys.stderr, flush=True)
        threading.Event().wait()  # never set: the loop thread blocks here
    return _null.handler(k, call, args)


SYSCALLS["sys.null"] = dataclasses.replace(_null, handler=_wedging_null)

if __name__ == "__main__":
    from kernel.boot import exit_now, main

    exit_now(main())  # as `python -m kernel` ends
