"""Hostile agent: writes stdout without bound. Refuses to run without RLIMIT_FSIZE.

Its report goes to stderr, since stdout is the file it fills."""

import errno
import json
import os
import resource
import sys

soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
if soft == resource.RLIM_INFINITY or soft > 64 << 20:
    print(json.dumps({"refused": f"RLIMIT_FSIZE {soft}"}), file=sys.stderr, flush=True)
    sys.exit(3)
block = b"x" * (1 << 16)
written, error = 0, None
try:
    for _ in range(100000):
        written += os.write(1, block)
except OSError as exc:
    error = errno.errorcode.get(exc.errno, exc.errno)
print(json.dumps({"written": written, "error": error, "limit": soft}), file=sys.stderr,
      flush=True)
