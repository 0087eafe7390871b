"""Blocks forever in a syscall (ipc.recv with no timeout), so a test can kill it mid-call."""

import sdk

with sdk.connect() as conn:
    print("blocking", flush=True)
    conn.ipc.recv()
