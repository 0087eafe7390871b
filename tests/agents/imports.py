"""Connects and makes a call, then prints the modules it has imported that its zygote template
had not (JSON; null when it was not forked from one) and exits."""

import json
import sys

import sdk

with sdk.connect() as conn:
    conn.sys.null()
    with conn.batch() as batch:
        batch.sys.null()
    template = sys.modules.get("kernel.proc.zygote")
    preloaded = getattr(template, "PRELOADED", None) or None
    print(json.dumps(None if preloaded is None else sorted(set(sys.modules) - preloaded)),
          flush=True)
