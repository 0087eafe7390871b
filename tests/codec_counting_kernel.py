"""`python -m kernel` with its msgpack codec counted: every encode and decode the kernel
process makes through `sdk.abi` or `msgspec.msgpack` adds one to a counter, as does every
token verification (`TokenAuthority.verify`), and SIGUSR1 writes
the counts so far to $AGENTOS_CODEC_COUNTS (JSON) and zeroes them. For tests that hold a door
to doing no serialisation inside the process (tests/kernel/doors/http/test_http_nocodec.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec

from kernel.access.tokens import TokenAuthority
from sdk import abi

counts: Counter[str] = Counter()
_lock = threading.Lock()


def _counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            counts[name] += 1
        return fn(*args, **kwargs)
    return counted


for _name in ("encode", "encode_reply", "decode_request", "decode_args", "decode_response",
              "decode_result"):
    setattr(abi, _name, _counted(f"abi.{_name}", getattr(abi, _name)))
for _name in ("encode", "decode"):
    setattr(msgspec.msgpack, _name, _counted(f"msgpack.{_name}", getattr(msgspec.msgpack, _name)))

TokenAuthority.verify = _counted("token.verify", TokenAuthority.verify)  # type: ignore[method-assign]


def _dump(signum: int, frame: Any) -> None:
    with _lock:
        snapshot = dict(counts)
        counts.clear()
    path = os.environ["AGENTOS_CODEC_COUNTS"]
    with open(path + ".tmp", "w") as out:
        json.dump(snapshot, out)
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR1, _dump)

if __name__ == "__main__":
    from kernel.boot import exit_now, main

    exit_now(main())  # as `python -m kernel` ends
