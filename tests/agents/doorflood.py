"""Opens connections to its HTTP door and holds them until the door refuses; then, with them
closed, makes one ordinary request. Returns the most it held open at once (a connection the
door closed meanwhile, at its keep-alive timeout on a slow machine, no longer counts), how many
were refused, and that request's status."""

import os
import socket
import time

from sdk import Agent

HOST, PORT = "127.0.0.1", 8080


class DoorFlood(Agent):
    def run(self, task: str) -> dict:
        held, refused, most = [], 0, 0
        request = (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   f"{os.environ['OPENAI_API_KEY']}\r\n\r\n").encode()
        for _ in range(64):
            if refused >= 3:
                break
            held = [s for s in held if open_(s)]
            s = socket.create_connection((HOST, PORT), timeout=5)
            s.sendall(request)
            reply = s.recv(65536)
            if reply.startswith(b"HTTP/1.1 503"):
                refused += 1
                s.close()
            else:
                held.append(s)  # keep-alive: the connection stays open, counted
                most = max(most, len(held))
        for s in held:
            s.close()
        time.sleep(0.5)
        with socket.create_connection((HOST, PORT), timeout=5) as s:
            s.sendall(request)
            status = int(s.recv(65536).split(b" ", 2)[1])
        return {"held": most, "refused": refused, "after": status}


def open_(s: socket.socket) -> bool:
    """Whether the door still holds `s` open (no EOF waiting on it); closed ones are closed."""
    s.setblocking(False)
    try:
        gone = s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        gone = False
    except OSError:
        gone = True
    s.setblocking(True)
    s.settimeout(5)
    if gone:
        s.close()
    return not gone
