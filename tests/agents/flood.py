"""Makes null syscalls as fast as it can until it is killed."""

import sdk

with sdk.connect() as conn:
    print("flooding", flush=True)
    while True:
        conn.sys.null()
