"""The in-sandbox listeners of the kernel's services: 127.0.0.1 TCP ports in the agent's own
network namespace (the HTTP door, the egress proxy), bound by the launcher as root in the fresh
namespace, before Landlock and seccomp, and handed to the kernel, which serves them itself
(kernel/proc/launch.py `hand_over`). It is what lets an unmodified client that only speaks TCP
(`OPENAI_BASE_URL=http://127.0.0.1:PORT/v1`) reach the kernel with no TCP to the host: the
namespace has only its own loopback. The stdlib only (the launcher starts with `-I -S`).
"""

from __future__ import annotations

import socket

PORTS = {"door": 8080, "proxy": 3128}  # inside the agent's own namespace: the same for all


def loopback_up() -> None:
    """Bring up `lo` in this (fresh) network namespace: the standard tier's unshare leaves it
    down (bubblewrap brings it up itself)."""
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, ifreq))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def listen(port: int) -> socket.socket:
    """A listener on 127.0.0.1:`port` (made as root, before the namespace's rules apply)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    s.setblocking(False)
    return s
