"""Floods: a huge result, a torrent of prints, or raw writes to its stdout fd."""

import os

MANIFEST = {"name": "flood", "description": "floods", "output_bytes": 100000, "concurrency": 1,
            "timeout_s": 20.0,
            "parameters": {"type": "object", "properties": {
                "how": {"enum": ["result", "print", "fd"]}}, "required": ["how"]}}


def run(args, ctx):
    if args["how"] == "result":
        return "x" * 5_000_000
    if args["how"] == "print":
        for _ in range(100_000):
            print("y" * 100)
        return "printed"
    chunk = b"z" * 65536
    for _ in range(1000):  # 64 MB, past the tool process's file size limit
        os.write(1, chunk)
    return "wrote"
