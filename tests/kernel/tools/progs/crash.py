"""Dies mid-call by a signal, or by exiting."""

import os
import signal

MANIFEST = {"name": "crash", "description": "dies", "concurrency": 1,
            "parameters": {"type": "object", "properties": {"how": {"enum": ["segv", "exit"]}}}}


def run(args, ctx):
    if args.get("how") == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGSEGV)
