"""Prints where its own kernel endpoint is (its socket's path) for another agent to try, then
lingers. (Its HTTP door has no path at all: a listener in its own network namespace.)"""

import os
import time

print(os.environ["AGENTOS_ENDPOINT"].removeprefix("ipc://"), flush=True)
time.sleep(900)
