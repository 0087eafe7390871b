"""The HTTP door inside every sandbox: the OpenAI and AIOS routes on 127.0.0.1:8080 of each
agent's own network namespace, where a request is that agent's call.

The agent's launcher binds the listener as root in the agent's fresh namespace and hands it to
the kernel over its report socket (kernel/proc/launch.py `hand_over`); the kernel serves it on
this door's thread. A socket stays in the namespace it was made in, whoever holds it, and only
the agent's own processes are in that namespace: whoever connects is the agent. So
`OPENAI_BASE_URL` is an ordinary URL, no TCP reaches the host, and no relay process sits between
(one ran per agent before: 2.5 MB of unique memory and a hop per request). The bearer key must be
a token for this very agent (its audience is `agent:<id>`, the key `OPENAI_API_KEY` holds is its
own token narrowed to that audience): another agent's key, a forged or expired one is a 401,
audited. The calls then go through the same bridge, access check, scheduler, budgets and audit
as the agent's SDK calls, under its own principal, so `agentos top` counts them as the agent's.

Connections are bounded per agent (`agent_door_connections`; a flood from one agent gets 503s
and leaves its neighbours' doors alone) and in total, with the HTTP front end's header, body
and timeout limits. The door runs one asyncio loop on a thread of its own, started with the
first agent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from kernel.doors.served import Served

if TYPE_CHECKING:
    from kernel.core import Kernel

log = logging.getLogger("kernel.doors.http")

AGENT_SCOPE_KEY = "agentos.agent"  # the ASGI scope entry naming the door's agent


def _protocol(keeper: Any, agent_id: int) -> type:
    """The connection class of one agent's door (uvicorn and Starlette load with the door,
    not with the kernel)."""
    from kernel.doors.http.limits import GuardedHttp

    class AgentHttp(GuardedHttp):
        """A connection at the agent's door: counted under the agent, its scope naming it."""

        def peer_key(self, transport: asyncio.BaseTransport) -> str | None:
            return f"agent:{agent_id}"  # the listener is in the agent's namespace alone

        def on_headers_complete(self) -> None:
            self.scope[AGENT_SCOPE_KEY] = agent_id  # type: ignore[index]
            super().on_headers_complete()

    AgentHttp.keeper = keeper
    AgentHttp.agent_id = agent_id  # type: ignore[attr-defined]
    return AgentHttp


class AgentDoor:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        from kernel.doors.http.limits import Doorkeeper

        c = kernel.config
        # One keeper for every agent's door: `max_per_peer` is per agent (the peer key).
        self.keeper = Doorkeeper(c.agent_door_total, c.agent_door_connections,
                                 c.http_header_timeout, c.http_body_timeout,
                                 c.http_header_bytes, c.http_body_bytes)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._served = Served("OpenAI door")
        self._config: Any = None
        self._state: Any = None

    def _start(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            import uvicorn
            from uvicorn.server import ServerState

            from kernel.doors.http.app import Routes

            self._state = ServerState()
            app = Routes(self.k, self.keeper, self.k.bridge).app()
            self._config = uvicorn.Config(app, log_config=None, access_log=False,
                                          lifespan="off", loop="asyncio")
            self._config.load()
            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, name="agent-door",
                                            daemon=True)
            self._thread.start()
        return self.loop

    def open(self, agent_id: int, sock: socket.socket) -> None:
        """Serve the agent's door on `sock`, the listener its launcher bound in the agent's
        namespace (from the kernel's loop, without waiting for the door's thread: connections
        made before it serves wait in the listener's backlog)."""
        sock.setblocking(False)
        loop = self._start()
        protocol = _protocol(self.keeper, agent_id)
        config, state = self._config, self._state

        def factory() -> asyncio.Protocol:
            return protocol(config=config, server_state=state, app_state={}, _loop=loop)

        async def start() -> asyncio.base_events.Server:
            try:
                return await loop.create_server(factory, sock=sock)
            except BaseException:
                sock.close()
                raise

        self._served.open(loop, agent_id, start)

    def close(self, agent_id: int) -> None:
        """Stop serving the agent's door and drop its open connections (the agent is over)."""
        if self.loop is None:
            return

        def drop() -> None:
            for conn in list(self._state.connections):
                if getattr(conn, "agent_id", None) == agent_id:
                    conn.shutdown()

        self._served.close(self.loop, agent_id, drop)

    def figures(self) -> dict[str, Any]:
        return {**self.keeper.figures(), "agents": len(self._served)}

    def stop(self) -> None:
        if self.loop is None:
            return
        for agent_id in self._served.opened():
            self.close(agent_id)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
