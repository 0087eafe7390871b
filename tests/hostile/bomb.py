"""Hostile agent: forks until the kernel says no. Refuses to run without a small RLIMIT_NPROC."""

import errno
import json
import os
import resource
import signal
import sys

soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
if os.getuid() == 0 or soft == resource.RLIM_INFINITY or soft > 256:
    print(json.dumps({"refused": f"uid {os.getuid()}, RLIMIT_NPROC {soft}"}), flush=True)
    sys.exit(3)
signal.alarm(30)  # never outlive the test
r, w = os.pipe()
children, failure = [], None
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError as exc:
        failure = errno.errorcode.get(exc.errno, exc.errno)
        break
    if pid == 0:
        os.close(w)
        signal.alarm(20)
        os.read(r, 1)  # until the parent closes its end (or dies)
        os._exit(0)
    children.append(pid)
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
print(json.dumps({"forked": len(children), "error": failure, "limit": soft}), flush=True)
