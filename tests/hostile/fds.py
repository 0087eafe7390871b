"""Hostile agent: opens files until the kernel says no. Refuses to run without RLIMIT_NOFILE."""

import errno
import json
import os
import resource
import sys

soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft == resource.RLIM_INFINITY or soft > 4096:
    print(json.dumps({"refused": f"RLIMIT_NOFILE {soft}"}), flush=True)
    sys.exit(3)
opened, error = [], None
try:
    for _ in range(100000):
        opened.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    error = errno.errorcode.get(exc.errno, exc.errno)
for fd in opened:
    os.close(fd)
print(json.dumps({"opened": len(opened), "error": error, "limit": soft}), flush=True)
