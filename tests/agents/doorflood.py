"""Opens connections to its HTTP door and holds them until the door refuses; then, with them
closed, makes one ordinary request. Returns how many were held, refused, and that status."""

import os
import socket
import time

from sdk import Agent

HOST, PORT = "127.0.0.1", 8080


class DoorFlood(Agent):
    def run(self, task: str) -> dict:
        held, refused = [], 0
        request = (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   f"{os.environ['OPENAI_API_KEY']}\r\n\r\n").encode()
        for _ in range(24):
            s = socket.create_connection((HOST, PORT), timeout=5)
            s.sendall(request)
            reply = s.recv(65536)
            if reply.startswith(b"HTTP/1.1 503"):
                refused += 1
                s.close()
            else:
                held.append(s)  # keep-alive: the connection stays open, counted
        for s in held:
            s.close()
        time.sleep(0.5)
        with socket.create_connection((HOST, PORT), timeout=5) as s:
            s.sendall(request)
            status = int(s.recv(65536).split(b" ", 2)[1])
        return {"held": len(held), "refused": refused, "after": status}
