"""A trivial agent: one line, then idles until told (for timing and parent-death tests)."""

import sys
import time

print("ready", flush=True)
if len(sys.argv) > 1:
    time.sleep(float(sys.argv[1]))
