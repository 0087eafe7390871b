"""A producer killed mid-burst: the consumer sees exactly the entries whose tail was published."""

from __future__ import annotations

import hashlib
import mmap
import random
import signal
import struct
import subprocess
import sys
import time

import msgspec

from kernel.doors.ring import RingPair
from sdk.ring import TAIL_OFFSET
from tests.conftest import ROOT

U32 = struct.Struct("I")  # to read the tail the dead producer left

PRELUDE = r"""
import hashlib, os, random, signal, sys
import msgspec
from sdk.ring import AgentRings, RingSpec
spec = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=RingSpec)
rings = AgentRings.attach(spec)
limit = spec.slot_size - 8

def entry(i):
    # Self-checking: its index, a digest of the index, and filler of an index-chosen length.
    body = i.to_bytes(8, "little") + hashlib.sha256(b"%d" % i).digest()
    return body + bytes([i & 0xFF]) * ((i * 37) % (limit - len(body) + 1))
"""

# Publishes `published` entries, then fills the next slots without moving the tail - one whole
# entry with its seq, one half-written - and dies.
TORN = PRELUDE + r"""
import mmap
from sdk.ring import HEADER_BYTES, Geometry, RingView, write_slot
published = int(sys.argv[2])
assert rings.submissions.push_many(entry(i) for i in range(published)) == published
geometry = Geometry(spec.capacity, spec.slot_size)
view = RingView(mmap.mmap(spec.submission, geometry.size), geometry)
mem = view.mem
for i in (published, published + 1):
    offset = HEADER_BYTES + (i % spec.capacity) * spec.slot_size
    if i == published:
        write_slot(view, offset, i, entry(i))
    else:
        mem[offset + 8:offset + 8 + limit // 2] = entry(i)[:limit // 2]
os.kill(os.getpid(), signal.SIGKILL)
"""

# Pushes forever, singly and in bursts, until killed.
BURST = PRELUDE + r"""
rng = random.Random(int(sys.argv[2]))
i = 0
print("go", flush=True)
while True:
    k = rng.choice([1, 1, 3, 17])
    n = rings.submissions.push_many(entry(j) for j in range(i, i + k)) if k > 1 else \
        int(rings.submissions.push(entry(i)))
    i += n
"""


def _check(payloads: list[bytes], first: int = 0) -> None:
    limit = 64 - 8
    for i, payload in enumerate(payloads, first):
        body = i.to_bytes(8, "little") + hashlib.sha256(b"%d" % i).digest()
        assert payload == body + bytes([i & 0xFF]) * ((i * 37) % (limit - len(body) + 1)), i


def _start(pair: RingPair, script: str, arg: str) -> subprocess.Popen[str]:
    spec = msgspec.msgpack.encode(pair.spec()).hex()
    return subprocess.Popen([sys.executable, "-c", script, spec, arg], cwd=ROOT,
                            pass_fds=pair.fds(), stdout=subprocess.PIPE, text=True)


def test_entries_written_but_never_published_do_not_exist() -> None:
    with RingPair.create(capacity=8, slot_size=64) as pair:
        proc = _start(pair, TORN, "5")
        assert proc.wait(timeout=20) == -signal.SIGKILL
        payloads, faults = pair.drain(64)
        assert faults == [] and len(payloads) == 5
        _check(payloads)
        assert pair.drain(64) == ([], [])


def test_producer_killed_at_random_points_mid_burst() -> None:
    rng = random.Random(7)
    for round_no in range(6):
        with RingPair.create(capacity=8, slot_size=64) as pair:
            proc = _start(pair, BURST, str(round_no))
            assert proc.stdout is not None and proc.stdout.readline() == "go\n"
            received: list[bytes] = []
            # Kill after a random number of entries rather than a random time, so a busy
            # machine changes how long this takes, not what it tests.
            kill_after = rng.randrange(20, 400)
            deadline = time.monotonic() + 10
            while len(received) < kill_after and time.monotonic() < deadline:
                payloads, faults = pair.drain(rng.choice([1, 5, 64]))
                assert faults == []
                received += payloads
                if not payloads:
                    time.sleep(0)  # let the producer have the core on a loaded machine
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            with mmap.mmap(pair.fds()[0], pair.geometry.size) as segment:
                segment_tail = U32.unpack_from(segment, TAIL_OFFSET)[0]
            while True:
                payloads, faults = pair.drain(64)
                assert faults == []
                if not payloads:
                    break
                received += payloads
            assert len(received) == segment_tail >= kill_after  # every published entry, only
            _check(received)
