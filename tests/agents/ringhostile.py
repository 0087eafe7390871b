"""A hostile agent: it maps its own rings by hand and, for argv[1] seconds, scribbles random
bytes over them, moves the submission tail backwards and far forwards, forges slots, and
floods the kernel's doorbell. It never makes a well-formed call."""

import mmap
import os
import random
import struct
import sys
import time

import msgspec

from sdk import layout
from sdk.ring import HEADER_BYTES, RingSpec

spec = msgspec.json.decode(os.environ[layout.ENV_RINGS], type=RingSpec)
size = HEADER_BYTES + spec.capacity * spec.slot_size
sq = mmap.mmap(spec.submission, size)
cq = mmap.mmap(spec.completion, size)
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
        slot = HEADER_BYTES + (head & (spec.capacity - 1)) * spec.slot_size
        struct.pack_into("II", sq, slot, (head + 1) & 0xFFFFFFFF, 40)
        sq[slot + 8:slot + 48] = rng.randbytes(40)
        struct.pack_into("I", sq, 0, (head + 1) & 0xFFFFFFFF)
    else:
        cq[0:HEADER_BYTES] = rng.randbytes(HEADER_BYTES)
    for _ in range(50):
        os.eventfd_write(spec.submission_doorbell, 1)
    rounds += 1
