"""Hangs: records its pid in its home, then sleeps (for ever, unless told how long)."""

import os
import time

MANIFEST = {"name": "hang", "description": "hangs", "timeout_s": 3.0, "concurrency": 1,
            "parameters": {"type": "object", "properties": {
                "tag": {"type": "string"}, "seconds": {"type": "number"}}}}


def run(args, ctx):
    with open(os.path.join(os.environ["HOME"], f"pid-{args.get('tag', 'x')}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(args.get("seconds", 1000))
    return "woke"
