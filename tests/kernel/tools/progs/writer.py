"""Writes a file (it sleeps as if it did) and reports when: writers of one path serialise."""

import time

MANIFEST = {"name": "writer", "description": "writes a path", "side_effect": "writes",
            "concurrency": 8, "resources": {"path": "path"},
            "parameters": {"type": "object", "properties": {
                "path": {"type": "string"}, "seconds": {"type": "number"}},
                "required": ["path", "seconds"]}}


def run(args, ctx):
    start = time.time()
    time.sleep(args["seconds"])
    return {"start": start, "end": time.time()}
