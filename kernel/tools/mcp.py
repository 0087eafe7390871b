"""MCP servers as tools: one sandboxed stdio server per mount, driven by the official `mcp` SDK.

Each mount owns a thread running an asyncio loop that holds the client session; the dispatch
loop hands it calls with `call` (thread-safe) and gets outcomes back through the job's `done`
callback, which posts to the loop. The server process is started through the sandbox launcher
(inline policy: its environment holds no secret), so it gets the same layers as a tool process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernel.proc.sandbox import Policy, launch_argv
from kernel.tools.manifest import Manifest, ManifestError
from kernel.tools.pool import HOST_BOOT, RUNTIME, Job, Outcome

log = logging.getLogger("kernel.tools")

CONNECT_TIMEOUT_S = 20.0
WATCH_S = 1.0  # how often an idle mount checks that its server still runs


def server_gone(exc: BaseException) -> bool:
    """Whether a call failed because the server's process ended (its pipes closed)."""
    import anyio

    if isinstance(exc, (anyio.ClosedResourceError, anyio.BrokenResourceError, EOFError)):
        return True
    return "Connection closed" in str(exc)


def resolve_command(command: list[str]) -> list[str]:
    """The command with argv[0] made absolute (the launcher does not search PATH)."""
    if not command:
        raise ValueError("an MCP server needs a command")
    exe = command[0]
    if not os.path.isabs(exe):
        found = shutil.which(exe) or shutil.which(exe, path=os.path.dirname(sys.executable))
        if found is None:
            raise ValueError(f"no program {exe!r} on PATH")
        exe = os.path.abspath(found)
    return [exe, *command[1:]]


def side_effect_of(annotations: Any) -> str:
    """MCP's hints to a side-effect class. Unannotated tools are destructive (MCP's default),
    so they need approval; the hints are the mounting administrator's trust in the server."""
    if annotations is None:
        return "destructive"
    if getattr(annotations, "read_only_hint", None):
        return "read-only"
    if getattr(annotations, "destructive_hint", None) is False:
        return "network" if getattr(annotations, "open_world_hint", None) else "writes"
    return "destructive"


class McpMount:
    def __init__(self, name: str, command: list[str], policy: Policy, log_path: Path) -> None:
        self.name = name
        self.command = resolve_command(command)
        self.policy = policy
        self.log_path = log_path
        self.manifests: dict[str, Manifest] = {}
        self.error: str | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = concurrent.futures.Future[None]()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name=f"mcp-{name}", daemon=True)
        # Runs on the mount's thread once it has ended, whatever ended it (the manager's
        # restart policy hangs off it).
        self.on_end: Callable[[], None] | None = None
        self.ready_at: float | None = None

    # --- the loop thread's side --------------------------------------------------------------

    def start(self, on_ready: Callable[[str | None], None]) -> None:
        """Connect in the background; `on_ready(error or None)` runs on the mount's thread."""
        self._ready.add_done_callback(lambda f: on_ready(self.error))
        self._thread.start()

    def call(self, tool: str, job: Job, timeout_s: float) -> None:
        coro = self._call(tool, job, timeout_s)
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop has closed: the server ended on its own
            coro.close()
            job.done(Outcome(code="EAGAIN", error=f"the MCP server of {self.name} has ended "
                             f"and is being restarted (see {self.log_path})"))
            return
        # Cancelling the future cancels the coroutine, and the SDK tells the server.
        job.on_cancel = fut.cancel

    def close(self) -> None:
        """Ask the mount to end (its server is stopped on the mount's own thread)."""
        if self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop closed meanwhile: the mount has ended anyway

    def stop(self) -> None:
        """End the mount and wait for it (kernel shutdown only: this blocks)."""
        self.close()
        self._thread.join(timeout=10)

    # --- the mount's thread ------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except Exception as exc:
            if self.error is None:
                self.error = f"{type(exc).__name__}: {exc}"
            log.warning("mcp mount ended", extra={"mount": self.name, "reason": self.error})
        finally:
            # Calls still in flight end with ECANCELED (their coroutines report it).
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            if not self._ready.done():
                self._ready.set_result(None)
            self._loop.close()
            if self.on_end is not None:
                self.on_end()

    async def _serve(self) -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        self._stop = asyncio.Event()
        # The tool runtime drops what privileges the sandbox left, then execs the server.
        argv = launch_argv(self.policy, [sys.executable, "-I", "-c", HOST_BOOT, str(RUNTIME),
                                         "--exec", *self.command])
        params = StdioServerParameters(command=argv[0], args=argv[1:], env={})
        with open(self.log_path, "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    try:
                        await asyncio.wait_for(session.initialize(), CONNECT_TIMEOUT_S)
                        listed = await asyncio.wait_for(session.list_tools(), CONNECT_TIMEOUT_S)
                    except TimeoutError:
                        self.error = (f"the server did not answer within {CONNECT_TIMEOUT_S:g}s "
                                      f"(see {self.log_path})")
                        raise
                    self.manifests = self._manifests(listed.tools)
                    self.session = session
                    self.ready_at = time.monotonic()
                    self._ready.set_result(None)
                    watch = asyncio.ensure_future(self._watch(session))
                    await self._stop.wait()
                    watch.cancel()

    async def _watch(self, session: Any) -> None:
        """Notice a server that exits between calls: a ping fails once its pipes close (a
        busy server only answers late, which is no reason to restart it)."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await session.send_ping()
            except Exception as exc:
                if server_gone(exc):
                    self.error = "the server exited"
                    log.warning("mcp server exited", extra={"mount": self.name})
                    assert self._stop is not None
                    self._stop.set()
                    return

    def _manifests(self, tools: list[Any]) -> dict[str, Manifest]:
        out = {}
        for tool in tools:
            name = f"{self.name}.{tool.name}"
            try:
                out[name] = Manifest.parse({
                    "name": name, "description": tool.description or "",
                    "parameters": tool.input_schema or {"type": "object"},
                    "result": tool.output_schema,
                    "side_effect": side_effect_of(tool.annotations)}, source=f"mcp:{self.name}")
            except ManifestError as exc:
                log.warning("mcp tool skipped", extra={"mount": self.name, "tool": tool.name,
                                                       "reason": str(exc)})
        return out

    async def _call(self, tool: str, job: Job, timeout_s: float) -> None:
        if self._stop is not None and self._stop.is_set():  # its server is gone
            job.done(Outcome(code="EAGAIN", error=f"the MCP server of {self.name} has ended "
                             "and is being restarted"))
            return
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(self.session.call_tool(tool, job.args), timeout_s)
        except TimeoutError:
            job.done(Outcome(code="ETIMEDOUT", error="the MCP server did not answer in time"))
            return
        except asyncio.CancelledError:
            job.done(Outcome(code="ECANCELED", error="cancelled"))
            raise
        except Exception as exc:
            if server_gone(exc):  # a typed fault, and the mount ends so it can be restarted
                self.error = "the server exited"
                job.done(Outcome(code="EIO", error=f"the MCP server of {self.name} exited "
                                 f"during the call; it is being restarted ({self.log_path})"))
                if self._stop is not None:
                    self._stop.set()
                return
            job.done(Outcome(error=f"MCP call failed: {type(exc).__name__}: {exc}"))
            return
        tool_ms = round((time.perf_counter() - start) * 1000, 3)
        texts = [c.text for c in getattr(result, "content", []) or [] if hasattr(c, "text")]
        structured = getattr(result, "structured_content", None)
        value = structured if structured is not None else "\n".join(texts)
        if getattr(result, "is_error", False):
            job.done(Outcome(error="\n".join(texts) or "the MCP tool reported an error",
                             tool_ms=tool_ms))
        else:
            job.done(Outcome(ok=True, value=value, tool_ms=tool_ms))
