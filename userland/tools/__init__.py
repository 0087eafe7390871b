"""Built-in tools: one module each, a MANIFEST dict and `run(args, ctx)`, run in tool processes."""
