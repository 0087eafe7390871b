"""A destructive tool the test kernel's config allows."""

MANIFEST = {"name": "wipe", "description": "destroys (allowed by config)",
            "side_effect": "destructive", "parameters": {"type": "object"}}


def run(args, ctx):
    return "wiped"
