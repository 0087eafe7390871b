"""A hostile agent: it maps its own rings by hand and, for argv[1] seconds, scribbles random
bytes over them, moves the submission tail backwards and far forwards, forges slots, and
floods the kernel's doorbell. It never makes a well-formed call."""

import mmap
import os
import random
import struct
import sys
import time

# The SDK took the spec out of the environment (and Landlock hides /proc/self/fd), but a
# hostile agent owns its whole process: it reads the SDK's own copy of the spec.
from sdk import ringpath
from sdk.ring import HEADER_BYTES

spec = ringpath._claim.spec
sq_fd, cq_fd = spec.submission, spec.completion
doorbells = [spec.submission_doorbell]
size = os.fstat(sq_fd).st_size
capacity, slot_size = int(sys.argv[2]), int(sys.argv[3])  # the kernel's defaults
sq = mmap.mmap(sq_fd, size)
cq = mmap.mmap(cq_fd, size)
rng = random.Random(0)
deadline = time.monotonic() + float(sys.argv[1])
rounds = 0
while time.monotonic() < deadline:
    what = rounds % 5
    if what == 0:
        at = rng.randrange(size - 64)
        sq[at:at + 64] = rng.randbytes(64)
    elif what == 1:
        tail = struct.unpack_from("I", sq, 0)[0]
        struct.pack_into("I", sq, 0, (tail - rng.randrange(1, 1000)) & 0xFFFFFFFF)
    elif what == 2:
        struct.pack_into("I", sq, 0, rng.randrange(2**32))
    elif what == 3:
        # A slot that looks published but holds garbage, and a tail that covers it.
        head = struct.unpack_from("I", sq, 64)[0]
        slot = HEADER_BYTES + (head & (capacity - 1)) * slot_size
        struct.pack_into("II", sq, slot, (head + 1) & 0xFFFFFFFF, 40)
        sq[slot + 8:slot + 48] = rng.randbytes(40)
        struct.pack_into("I", sq, 0, (head + 1) & 0xFFFFFFFF)
    else:
        cq[0:HEADER_BYTES] = rng.randbytes(HEADER_BYTES)
    for _ in range(50):
        for fd in doorbells:
            os.eventfd_write(fd, 1)
    rounds += 1
