"""An idle agent for tools/bench/agents_scale.py: connects, says ready, blocks in ipc.recv."""

import sdk

with sdk.connect() as conn:
    conn.sys.null()
    print("ready", flush=True)
    conn.ipc.recv()
