"""Hostile agent: writes 64 MiB to stdout as fast as it can, then reports on stderr."""

import json
import os
import sys

block = b"x" * (1 << 16)
written = 0
for _ in range(1024):
    written += os.write(1, block)
print(json.dumps({"written": written}), file=sys.stderr, flush=True)
