"""A program that reaches the network as third-party code does: urllib (or httpx) with the
proxy the environment names, knowing nothing of agentos. argv[1] is a JSON list of steps, each
one of

- {"get": URL, "ca": PEM?, "client": "urllib"|"httpx"}: fetch it; status and body, or the error;
- {"raw": REQUEST}: send these bytes to the proxy itself; the status line and body it answers;
- {"direct": [HOST, PORT]}: a TCP connection without the proxy;
- {"tunnel": "HOST:PORT", "hold": SECONDS}: CONNECT, echo "ping" through it, then wait for
  the tunnel to be closed (by the kernel) or SECONDS to pass;
- {"env": 1}: the proxy variables it was started with;
- {"mail": 1}: take {"token": ...} from its mailbox and name it in the proxy URLs from then on
  (sent as `Proxy-Authorization`);
- {"flood": N, "target": "HOST:PORT", "hold": SECONDS}: open N tunnels at once and hold them.

Each step's outcome is printed as one JSON line as soon as it is known."""

import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

PROXY = urllib.parse.urlsplit(os.environ.get("HTTP_PROXY", "http://127.0.0.1:3128"))


def get(step):
    ctx = ssl.create_default_context(cadata=step["ca"]) if step.get("ca") else None
    if step.get("client") == "httpx":
        import httpx

        r = httpx.get(step["get"], verify=ctx or True, timeout=10)
        return {"status": r.status_code, "body": r.text}
    try:  # an opener per step: its ProxyHandler reads the environment as it is now
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
        with opener.open(step["get"], timeout=10) as r:
            return {"status": r.status, "body": r.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()}


def to_proxy():
    return socket.create_connection((PROXY.hostname, PROXY.port), timeout=10)


def read_all(s):
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def raw(step):
    with to_proxy() as s:
        s.sendall(step["raw"].encode())
        head, _, body = read_all(s).partition(b"\r\n\r\n")
    return {"line": head.split(b"\r\n")[0].decode(), "body": body.decode()}


def connect(target):
    s = to_proxy()
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    line = s.recv(4096).split(b"\r\n")[0].decode()
    return s, line


def tunnel(step):
    s, line = connect(step["tunnel"])
    s.sendall(b"ping")
    echo = s.recv(4096).decode()
    print(json.dumps({"open": line, "echo": echo}), flush=True)
    s.settimeout(step["hold"])
    start = time.monotonic()
    try:
        closed = s.recv(4096) == b""
    except (TimeoutError, OSError) as exc:
        closed = isinstance(exc, ConnectionResetError)
    return {"closed": closed, "after_s": round(time.monotonic() - start, 2)}


def flood(step):
    held, lines = [], []
    for _ in range(step["flood"]):
        try:
            s, line = connect(step["target"])
        except OSError as exc:
            lines.append(type(exc).__name__)
            continue
        lines.append(line)
        if " 200 " in line:
            held.append(s)
        else:
            s.close()
    print(json.dumps({"held": len(held)}), flush=True)
    time.sleep(step["hold"])
    return {"held": len(held), "lines": lines}


def mail(step):
    """Take a token from the mailbox and send it as the proxy's credentials from now on."""
    import sdk

    with sdk.connect() as conn:
        token = conn.ipc.recv(timeout=30).data["token"]
        if step.get("ack"):
            conn.ipc.send(step["ack"], "got it")
    proxy = f"http://agent:{token}@127.0.0.1:3128"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        os.environ[name] = os.environ[name.lower()] = proxy
    return {"token": len(token)}


def env(step):
    return {k: v for k, v in os.environ.items() if "proxy" in k.lower()}


def direct(step):
    with socket.create_connection(tuple(step["direct"]), timeout=5):
        return {"connected": True}


for step in json.loads(sys.argv[1]):
    kind = next(k for k in ("get", "raw", "direct", "tunnel", "flood", "env", "mail") if k in step)
    try:
        outcome = globals()[kind](step)
    except Exception as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps({kind: outcome}), flush=True)
