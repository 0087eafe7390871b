"""Sleeps, and reports when it ran: for the concurrency limit and the resource locks."""

import time

MANIFEST = {"name": "slow", "description": "sleeps", "concurrency": 3, "timeout_s": 30.0,
            "parameters": {"type": "object", "properties": {
                "seconds": {"type": "number", "maximum": 5}}, "required": ["seconds"]}}


def run(args, ctx):
    start = time.time()
    time.sleep(args["seconds"])
    return {"start": start, "end": time.time()}
