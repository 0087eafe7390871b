"""Hostile agent: squats an abstract Unix socket name for host programs (or other agents) to
connect to, or connects to one; prints one JSON line of outcomes.

argv: `serve NAME SECONDS` binds `\\0NAME`, says so in $HOME/bound, and answers whoever
connects within SECONDS; `connect NAME` tries to reach `\\0NAME`."""

import errno
import json
import os
import socket
import sys

mode, name = sys.argv[1], "\0" + sys.argv[2]
out = {}
if mode == "serve":
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(name)
        server.listen(8)
        out["bound"] = True
    except OSError as exc:
        out["bound"] = errno.errorcode.get(exc.errno, str(exc.errno))
    with open(os.path.join(os.environ["HOME"], "bound"), "w") as f:
        f.write(json.dumps(out["bound"]))
    out["accepted"] = 0
    if out["bound"] is True:
        server.settimeout(float(sys.argv[3]))
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(2)
                    if conn.recv(64):
                        conn.sendall(b"squatted")
                    out["accepted"] += 1
        except TimeoutError:
            pass
else:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(name)
            s.sendall(b"hello")
            out["connect"] = s.recv(64).decode()
        except OSError as exc:
            out["connect"] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(out), flush=True)
