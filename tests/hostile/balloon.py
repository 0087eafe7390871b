"""Hostile agent: allocates memory without bound. Refuses to run without RLIMIT_AS <= 2 GiB."""

import json
import resource
import sys

soft, _ = resource.getrlimit(resource.RLIMIT_AS)
if soft == resource.RLIM_INFINITY or soft > 2 << 30:
    print(json.dumps({"refused": f"RLIMIT_AS {soft}"}), flush=True)
    sys.exit(3)
chunks = []
try:
    for _ in range(4096):
        chunks.append(bytearray(16 << 20))
    error = None
except MemoryError:
    error = "MemoryError"
allocated = len(chunks) * 16
chunks.clear()
print(json.dumps({"allocated_mib": allocated, "error": error, "limit": soft}), flush=True)
