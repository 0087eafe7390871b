"""Hostile agent: fills its home (the host's disk, if nothing stops it) and opens it to every
uid; prints one JSON line: bytes written, the errno that stopped it, the mode it left.

argv[1]: bytes to try to write (in 1 MiB files, so RLIMIT_FSIZE is not what stops it)."""

import errno
import json
import os
import sys

home = os.environ["HOME"]
want = int(sys.argv[1])
chunk = b"\xa5" * (1 << 20)
written, error = 0, None
try:
    while written < want:
        with open(os.path.join(home, f"fill-{written >> 20}"), "wb") as f:
            f.write(chunk)  # ext4 reserves the blocks at write(): ENOSPC comes here
        written += len(chunk)
except OSError as exc:
    error = errno.errorcode.get(exc.errno, str(exc.errno))
os.chmod(home, 0o777)  # left open for whoever comes after it
print(json.dumps({"written": written, "error": error,
                  "mode": oct(os.stat(home).st_mode & 0o777)}), flush=True)
