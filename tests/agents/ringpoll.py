"""Back-to-back sys.null calls over the rings; returns how many entries the kernel took from
its rings meanwhile and how many of those rounds began with a doorbell (the rest it found by
polling, `ring_poll_us`)."""

import sys

import sdk

calls = int(sys.argv[1])
with sdk.connect() as conn:
    for _ in range(50):  # warm up: the polling window adapts to this agent's pace
        conn.sys.null()
    before = conn.sys.stats().syscalls
    for _ in range(calls):
        conn.sys.null()
    after = conn.sys.stats().syscalls
    conn.proc.exit({name: after.get(name, 0) - before.get(name, 0)
                    for name in ("ring.entries", "ring.doorbells", "ring.polled")}
                   | {"rings": conn.uses_rings})
