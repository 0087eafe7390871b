"""Each agent's listeners served on a helper loop, opened and closed from the kernel loop
without waiting for it: a close that arrives while the server is being made still closes it."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from kernel.doors.served import Served


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Until everything posted to `loop` so far has run."""
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(5)


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(await r.read(10))
    await w.drain()
    w.close()


def test_open_serves_without_waiting_and_close_stops(loop: asyncio.AbstractEventLoop) -> None:
    served, sock = Served("test door"), _listener()
    port = sock.getsockname()[1]
    # A client that connects before the server exists waits in the listener's backlog.
    early = socket.create_connection(("127.0.0.1", port), timeout=5)
    served.open(loop, 7, lambda: asyncio.start_server(_echo, sock=sock))
    early.sendall(b"hello")
    assert early.recv(10) == b"hello"
    assert len(served) == 1 and served.opened() == [7]
    ran = threading.Event()
    served.close(loop, 7, ran.set)
    assert ran.wait(5)
    _settle(loop)
    assert len(served) == 0 and served.opened() == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).recv(1)


def test_a_close_while_the_server_is_being_made_closes_it(
        loop: asyncio.AbstractEventLoop) -> None:
    served, sock = Served("test door"), _listener()
    made = threading.Event()
    release = asyncio.Event()
    servers: list[asyncio.base_events.Server] = []

    async def slow_start() -> asyncio.base_events.Server:
        made.set()
        await release.wait()  # the helper loop is still making it when the close arrives
        server = await asyncio.start_server(_echo, sock=sock)
        servers.append(server)
        return server

    served.open(loop, 9, slow_start)
    assert made.wait(5)
    served.close(loop, 9)
    _settle(loop)
    loop.call_soon_threadsafe(release.set)
    _settle(loop)
    assert len(servers) == 1 and not servers[0].is_serving()
    assert len(served) == 0 and not served._ended  # nothing kept for the agent


def test_a_server_that_cannot_start_is_logged_and_forgotten(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture) -> None:
    served = Served("test door")

    async def broken() -> asyncio.base_events.Server:
        raise OSError("no such listener")

    served.open(loop, 3, broken)
    _settle(loop)
    assert len(served) == 0
    assert "cannot serve the agent's test door" in caplog.text
    served.close(loop, 3)
    _settle(loop)
    assert not served._ended
