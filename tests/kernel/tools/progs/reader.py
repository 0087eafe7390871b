"""Reads a file (it sleeps as if it did) and reports when: readers of one path share it."""

import time

MANIFEST = {"name": "reader", "description": "reads a path", "side_effect": "read-only",
            "concurrency": 8, "resources": {"path": "path"},
            "parameters": {"type": "object", "properties": {
                "path": {"type": "string"}, "seconds": {"type": "number"}},
                "required": ["path", "seconds"]}}


def run(args, ctx):
    start = time.time()
    time.sleep(args["seconds"])
    return {"start": start, "end": time.time(), "path": args["path"]}
