"""Leaves a double-forked grandchild that ignores SIGTERM and outlives its parent, then blocks:
ending this agent must end the grandchild too."""

import os
import signal
import sys
import time

if os.fork() == 0:
    if os.fork() > 0:
        os._exit(0)  # the grandchild is an orphan now
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(60)
os.wait()
print("ready", flush=True)
while True:
    time.sleep(60)
sys.exit(0)
