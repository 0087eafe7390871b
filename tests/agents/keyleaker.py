"""Prints its own door key (OPENAI_API_KEY) for another agent to try, then lingers."""

import os
import time

print(os.environ["OPENAI_API_KEY"], flush=True)
time.sleep(60)
