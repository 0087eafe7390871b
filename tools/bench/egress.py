"""Egress proxy overhead: a sandboxed agent reaching a local server through the kernel's proxy
(kernel/doors/egress.py), against the same client connecting directly from the host.

Measured: a fresh tunnel (CONNECT, capability check, connect, one echo) p50; an echo round trip
inside an open tunnel p50; a download's MiB/s. The last line is
`RESULT setup_p50_ms=... echo_p50_ms=... mib_per_s=...` with the direct figures beside them.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools/bench"))

from egress_agent import measure  # noqa: E402
from kernelproc import boot_kernel  # noqa: E402

import sdk  # noqa: E402

AGENT = str(ROOT / "tools/bench/egress_agent.py")


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Source(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        block = b"\0" * (1 << 20)
        for _ in range(int(self.rfile.readline())):
            self.wfile.write(block)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--mib", type=int, default=256)
    args = p.parse_args()
    servers = [socketserver.ThreadingTCPServer(("127.0.0.1", 0), h) for h in (Echo, Source)]
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    echo_port, source_port = (s.server_address[1] for s in servers)
    direct = measure("127.0.0.1", echo_port, source_port, args.rounds, args.mib, None)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        kernel = boot_kernel(state)
        try:
            with sdk.connect(state_dir=state) as conn:
                caps = [f"net.connect@127.0.0.1:{port}" for port in (echo_port, source_port)]
                agent_id = conn.proc.spawn(AGENT, name="egressbench", caps=caps, argv=[
                    "127.0.0.1", str(echo_port), str(source_port), str(args.rounds),
                    str(args.mib)])
                info = conn.proc.wait(agent_id, timeout=300)
                out = conn.proc.logs(agent_id, "stdout").data.decode()
                if info.exit_status != 0:
                    print(conn.proc.logs(agent_id, "stderr").data.decode(), file=sys.stderr)
                    return 1
        finally:
            kernel.terminate()
            kernel.wait(30)
    proxied = json.loads(out.strip().splitlines()[-1])
    print(f"{'':16}{'proxy':>10}{'direct':>10}")
    for key in ("setup_p50_ms", "echo_p50_ms", "mib_per_s"):
        print(f"{key:16}{proxied[key]:10.3f}{direct[key]:10.3f}")
    print("RESULT " + " ".join(f"{k}={proxied[k]:.3f} direct_{k}={direct[k]:.3f}"
                               for k in ("setup_p50_ms", "echo_p50_ms", "mib_per_s")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
