"""sd_notify against a real datagram socket, as systemd would listen."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from kernel.notify import Notifier


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_notify_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _listener(path) as sock:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": str(os.getpid())})
        n.notify("READY=1", "STATUS=up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        assert n.watchdog_interval == 0.5
        n.watchdog(now=100.0)
        n.watchdog(now=100.1)  # not due yet: no second ping
        n.watchdog(now=100.6)
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
        sock.settimeout(0.1)
        try:
            extra = sock.recv(4096)
        except TimeoutError:
            extra = None
        assert extra is None


def test_notify_abstract_socket() -> None:
    name = f"agentos-test-{uuid.uuid4().hex}"
    with _listener("\0" + name) as sock:
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_watchdog_for_another_pid_is_off() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None


def test_without_notify_socket_nothing_happens() -> None:
    n = Notifier({})
    assert not n.enabled
    n.notify("READY=1")
    n.watchdog()
