"""Double-forks a grandchild that outlives its parent, then has it call the kernel with the
agent's own token: it must still be this agent, never `user:<uid>`."""

import json
import os
import sys
import time

import sdk

r, w = os.pipe()
if os.fork() == 0:
    if os.fork() > 0:
        os._exit(0)  # the grandchild is an orphan now (setsid is denied by seccomp)
    os.close(r)
    time.sleep(0.1)  # let the middle process go: nobody the kernel spawned is our parent now
    out = {}
    try:
        agent_id = int(os.environ["AGENTOS_AGENT_ID"])
        with sdk.connect(timeout=10) as conn:
            conn.sys.null()
            out["info"] = conn.proc.info(agent_id).id  # allowed only as agent:<id>
    except sdk.SyscallError as exc:
        out["error"] = exc.code.name
    try:
        with open(sys.argv[1]) as f:  # the kernel's admin token
            out["admin_token"] = f.read()[:4]
    except OSError as exc:
        out["admin_token"] = type(exc).__name__
    os.write(w, json.dumps(out).encode())
    os._exit(0)
os.close(w)
os.wait()
data = b""
while chunk := os.read(r, 4096):
    data += chunk
print(data.decode(), flush=True)
sys.exit(0)
