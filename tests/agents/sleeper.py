"""Records a result with proc.exit, says so, then lingers (so a test can crash the kernel)."""

import time

import sdk

with sdk.connect() as conn:
    conn.proc.exit({"answer": 42})
    print("acked", flush=True)
    time.sleep(60)
