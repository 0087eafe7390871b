"""Prints a counter every 20 ms until killed (so a test can see it stop and go on)."""

import time

n = 0
while True:
    print(n, flush=True)
    n += 1
    time.sleep(0.02)
