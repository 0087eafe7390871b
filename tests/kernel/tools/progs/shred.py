"""A destructive tool nobody allowed."""

MANIFEST = {"name": "shred", "description": "destroys (not allowed)",
            "side_effect": "destructive", "parameters": {"type": "object"}}


def run(args, ctx):
    return "shredded"
