"""The HTTP front end's thread: uvicorn serving the routes on its own asyncio loop.

Off by default; `agentos boot --http HOST:PORT` (or `http = "HOST:PORT"` under `[kernel]`)
turns it on. It runs inside the kernel process but touches kernel state only through
`Calls.post` (see `bridge.py`), so the dispatch loop stays the single owner of that state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING

import uvicorn

from kernel.doors.http.app import Routes
from kernel.doors.http.limits import Doorkeeper, guarded

if TYPE_CHECKING:
    from kernel.core import Kernel

log = logging.getLogger("kernel.doors.http")


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8000` for IPv6); ValueError if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad --http {text!r}: want HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


class HttpServer(threading.Thread):
    """The `--http HOST:PORT` listener; its calls go through the kernel's one HTTP bridge
    (bridge.py: `Bridge`, and `HttpDoor` delivers their outcomes)."""

    def __init__(self, kernel: Kernel, listen: str) -> None:
        super().__init__(name="http", daemon=True)
        host, port = parse_listen(listen)
        c = kernel.config
        self.keeper = Doorkeeper(c.http_max_connections, c.http_max_per_peer,
                                 c.http_header_timeout, c.http_body_timeout,
                                 c.http_header_bytes, c.http_body_bytes)
        self.routes_app = Routes(kernel, self.keeper, kernel.bridge)
        config = uvicorn.Config(self.routes_app.app(), host=host, port=port,
                                log_config=None, access_log=False, lifespan="off",
                                loop="asyncio", http=guarded(self.keeper),
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        # uvicorn's banner lines would repeat ours; its warnings and errors still come through.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as exc:  # uvicorn exits with SystemExit when it cannot bind
            self.error = exc

    def start_serving(self, timeout: float = 10.0) -> None:
        """Start the thread and wait until it listens; OSError if it cannot."""
        self.start()
        for _ in range(int(timeout * 100)):
            if self.server.started:
                break
            if not self.is_alive():
                raise OSError(f"cannot serve HTTP on {self._where()} ({self.error!r}); is the "
                              "port in use?")
            self.join(0.01)
        else:
            raise OSError(f"HTTP front end on {self._where()} did not start in {timeout} s")
        log.info("http front end ready", extra={"listen": f"{self.server.config.host}:"
                                                           f"{self.port()}"})

    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self.server.servers[0].sockets[0].getsockname()[1]

    def _where(self) -> str:
        return f"{self.server.config.host}:{self.server.config.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.join(timeout=5)
