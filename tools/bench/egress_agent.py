"""The egress benchmark's agent: through the proxy at $HTTPS_PROXY, `rounds` fresh tunnels
(CONNECT and one echo each), `rounds` echoes in one tunnel, and a download of `mb` MiB; one
JSON line of p50s (ms) and MiB/s. The same code measures the direct path (tools/bench/egress.py)."""

import json
import os
import socket
import statistics
import sys
import time
import urllib.parse


def dial(host, port, proxy):
    if proxy is None:
        return socket.create_connection((host, port))
    s = socket.create_connection((proxy.hostname, proxy.port))
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return s


def measure(host, echo_port, source_port, rounds, mb, proxy):
    setups, echoes = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        with dial(host, echo_port, proxy) as s:
            s.sendall(b"x")
            s.recv(16)
        setups.append((time.perf_counter() - t) * 1000)
    with dial(host, echo_port, proxy) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            t = time.perf_counter()
            s.sendall(b"x")
            s.recv(16)
            echoes.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    got = 0
    with dial(host, source_port, proxy) as s:
        s.sendall(str(mb).encode() + b"\n")
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    seconds = time.perf_counter() - t
    assert got == mb << 20, got
    return {"setup_p50_ms": statistics.median(setups), "echo_p50_ms": statistics.median(echoes),
            "mib_per_s": mb / seconds}


if __name__ == "__main__":
    host, echo_port, source_port, rounds, mb = sys.argv[1:6]
    proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
    print(json.dumps(measure(host, int(echo_port), int(source_port), int(rounds), int(mb),
                             proxy)))
