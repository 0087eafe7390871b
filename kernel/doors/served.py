"""Each agent's listeners served on a helper thread's asyncio loop (its OpenAI door, its egress
proxy), opened and closed from the kernel's loop without waiting for that thread.

Opening used to wait for the server to exist (`run_coroutine_threadsafe(...).result()`), so
that a close posted after it would find it: two cross-thread round trips per spawn, an eighth
of a spawn's time at 2,000 agents, and a dispatch loop that stalls whenever a helper loop is
slow. Here `open` only posts; a `close` that reaches the helper loop while the server is still
being made marks the agent ended, and the server is closed as soon as it exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("kernel.doors")

Start = Callable[[], Coroutine[Any, Any, asyncio.base_events.Server]]


class Served:
    def __init__(self, what: str) -> None:
        self.what = what
        self.servers: dict[int, asyncio.base_events.Server] = {}  # the helper loop's
        self._making: set[int] = set()  # the helper loop's: servers being made
        self._ended: set[int] = set()  # the helper loop's: closed while being made
        self._opened: set[int] = set()  # the kernel loop's: opened and not yet closed

    def open(self, loop: asyncio.AbstractEventLoop, agent_id: int, start: Start) -> None:
        """From the kernel loop: serve what `start` makes, on `loop`, for `agent_id`."""
        self._opened.add(agent_id)

        async def serve() -> None:
            self._making.add(agent_id)
            try:
                server = await start()
            except Exception:
                log.exception(f"cannot serve the agent's {self.what}", extra={"agent": agent_id})
                return
            finally:
                self._making.discard(agent_id)
                ended = agent_id in self._ended
                self._ended.discard(agent_id)
            if ended:
                server.close()
            else:
                self.servers[agent_id] = server

        asyncio.run_coroutine_threadsafe(serve(), loop)

    def close(self, loop: asyncio.AbstractEventLoop, agent_id: int,
              then: Callable[[], None] | None = None) -> None:
        """From the kernel loop: stop serving `agent_id` (`then` runs on `loop` after)."""
        if agent_id not in self._opened:
            return
        self._opened.discard(agent_id)

        def stop() -> None:
            server = self.servers.pop(agent_id, None)
            if server is not None:
                server.close()
            elif agent_id in self._making:
                self._ended.add(agent_id)  # closed as soon as it is made
            if then is not None:
                then()

        loop.call_soon_threadsafe(stop)

    def opened(self) -> list[int]:
        """The kernel loop's view: agents opened and not closed."""
        return list(self._opened)

    def __len__(self) -> int:
        return len(self.servers)
