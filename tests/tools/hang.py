"""Never answers: records its pid in its home, then sleeps."""

import os
import time

MANIFEST = {"name": "hang", "description": "hangs", "timeout_s": 3.0, "concurrency": 2,
            "parameters": {"type": "object", "properties": {"tag": {"type": "string"}}}}


def run(args, ctx):
    with open(os.path.join(os.environ["HOME"], f"pid-{args.get('tag', 'x')}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1000)
