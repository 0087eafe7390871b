"""Well-behaved agent: uses what it is given (home, its socket, fork, exec, threads) and says ok."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

home = os.environ["HOME"]
done = {}
with open(os.path.join(home, "notes"), "w") as f:
    f.write("mine")
with open(os.path.join(home, "notes")) as f:
    done["home"] = f.read() == "mine"
os.makedirs(os.path.join(home, "sub"), exist_ok=True)
with tempfile.TemporaryFile(dir=home) as f:
    done["tempfile"] = f.write(b"x") == 1
a, b = socket.socketpair()
a.sendall(b"ping")
done["socketpair"] = b.recv(4) == b"ping"
pid = os.fork()
if pid == 0:
    os._exit(7)
done["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
done["exec"] = subprocess.run(["/usr/bin/true"]).returncode == 0
box = []
t = threading.Thread(target=lambda: box.append(1))
t.start()
t.join()
done["thread"] = box == [1]
if len(sys.argv) > 1:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sys.argv[1])
        s.sendall(b"hello")
        done["own_socket"] = s.recv(5) == b"hello"
print(json.dumps({"ok": all(done.values()), "checks": done}), flush=True)
