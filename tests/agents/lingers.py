"""Reports its result with proc.exit, then lingers past the kernel's grace (a slow shutdown)."""

import signal
import time

import sdk

signal.signal(signal.SIGTERM, signal.SIG_IGN)
with sdk.connect() as conn:
    conn.proc.exit({"done": True})
time.sleep(120)
