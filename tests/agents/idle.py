"""Sleeps without reading its mailbox, so messages sent to it stay queued."""

import time

print("idle", flush=True)
time.sleep(120)
