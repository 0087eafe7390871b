"""Prints where its own door is (its socket's path) for another agent to try, then lingers."""

import os
import time

print(os.environ["AGENTOS_HTTP_SOCKET"], flush=True)
time.sleep(900)
