"""The tool manager, loop-thread side: `tools.*` syscalls, the registry, limits and locks.

A call is checked whole before anything runs: the tool exists, its arguments fit the schema
(EINVAL), the capability covers the tool and every path or host it names (EPERM), and a
destructive tool is approved. It then waits for its resources (readers share, writers are
alone) and for a slot under the tool's concurrency limit, and runs in a worker thread (local
tools, `pool.py`) or an MCP mount's thread (`mcp.py`); the dispatch loop never blocks on a tool.
The outcome comes back through `Calls.post`. Cancelling the call (the agent dies, or its
deadline passes) kills the tool's process or cancels the MCP request.
"""

from __future__ import annotations

import ast
import collections
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.call import PENDING, Call, Caller, Calls, Fault
from kernel.proc import sandbox
from kernel.tools.locks import Request, ResourceLocks
from kernel.tools.manifest import Manifest, ManifestError
from kernel.tools.mcp import McpMount, resolve_command
from kernel.tools.pool import RUNTIME, Job, Outcome, ToolPool, tool_policy
from sdk import abi, endpoints

if TYPE_CHECKING:
    from kernel.access.approvals import Approvals
    from kernel.access.audit import AuditLog
    from kernel.access.guard import Guard
    from kernel.config import Config
    from kernel.proc.table import ProcessTable
    from kernel.state import StateDir

log = logging.getLogger("kernel.tools")

BUILTIN_DIR = sandbox.PROJECT_ROOT / "userland" / "tools"
NOT_TOOLS = {"__init__.py", "runtime.py"}


def read_manifest(path: Path) -> dict[str, Any]:
    """A tool file's `MANIFEST = {...}`, read from its syntax tree: the kernel never runs tool
    code, not even to learn what the tool is."""
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "MANIFEST"):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                raise ManifestError(f"{path}: MANIFEST must be a literal dict") from None
    raise ManifestError(f"{path}: no MANIFEST")


@dataclass(eq=False)
class Tool:
    manifest: Manifest
    pool: ToolPool | None = None  # a local tool
    mount: McpMount | None = None  # an MCP server's tool
    remote_name: str = ""  # the tool's name on its MCP server
    running: int = 0
    # Calls holding their locks until a slot frees, oldest first; keyed so a cancel is O(1).
    waiting: collections.OrderedDict[Pending, None] = field(
        default_factory=collections.OrderedDict)


@dataclass(eq=False)
class Pending:
    call: Call
    tool: Tool
    arguments: dict[str, Any]
    ctx: dict[str, Any]
    arrived: float
    lock: Request | None = None
    job: Job | None = None
    finished: bool = False


class ToolManager:
    def __init__(self, *, approvals: Approvals, audit: AuditLog, calls: Calls, config: Config,
                 guard: Guard, procs: ProcessTable, state: StateDir) -> None:
        self.approvals = approvals
        self.audit = audit
        self.calls = calls
        self.config = config
        self.guard = guard
        self.procs = procs
        self.state = state
        self.tools: dict[str, Tool] = {}
        self.mounts: dict[str, McpMount] = {}
        self.mount_state: dict[str, str] = {}
        self.failed_mounts: dict[str, abi.MountInfo] = {}
        self.mount_restarts: dict[str, int] = {}  # restarts after its server died, in a row
        self.stopping = False
        self.inflight: set[Pending] = set()
        self.locks = ResourceLocks()
        # Where the search tool looks besides the caller's home: other managers (memory) add
        # functions from a caller to [{"kind": ..., "path": ...}] here.
        self.sources: list[Callable[[Caller], list[dict[str, str]]]] = []
        self.dir = state.root / "tools"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.tier, self.sandbox_error = self._choose_tier()
        for path in self._tool_files():
            try:
                manifest = Manifest.parse(read_manifest(path), source=str(path))
            except (ManifestError, SyntaxError, OSError) as exc:
                log.error("tool not loaded", extra={"path": str(path), "reason": str(exc)})
                continue
            if manifest.name in self.tools:
                log.error("duplicate tool name", extra={"tool": manifest.name, "path": str(path)})
                continue
            index = len(self.tools)
            pool = ToolPool(manifest, str(path), lambda m=manifest, p=path, i=index:
                            self._policy(m, str(p), i), self.dir)
            self.tools[manifest.name] = Tool(manifest, pool=pool)

    def _tool_files(self) -> list[Path]:
        files = sorted(p for p in BUILTIN_DIR.glob("*.py") if p.name not in NOT_TOOLS)
        for d in self.config.tool_dirs:
            files += sorted(p for p in Path(d).glob("*.py") if not p.name.startswith("_"))
        return [p.resolve() for p in files]

    # --- sandbox -----------------------------------------------------------------------------

    def _choose_tier(self) -> tuple[str, str | None]:
        probe = sandbox.probe()
        wanted = self.config.tool_sandbox
        if wanted == "auto":
            # Standard needs a uid of the tools' own that can reach the interpreter, its
            # standard library and the tools' homes; otherwise confine under the kernel's uid.
            uid = self.config.tool_uid_base
            needed = [os.path.realpath(sys.executable), *sandbox.runtime_paths(),
                      str(BUILTIN_DIR), str(self.dir)]
            if (not any(layer in probe.missing for layer in sandbox.TIERS["standard"])
                    and all(sandbox.unreachable_dir(p, uid, uid) is None for p in needed)):
                return "standard", None
            wanted = "confined"
        try:
            sandbox.plan(wanted, probe)
        except (sandbox.SandboxUnavailable, ValueError) as exc:
            log.error("tool sandbox unavailable", extra={"reason": str(exc)})
            return wanted, str(exc)
        return wanted, None

    def _policy(self, manifest: Manifest, tool_file: str, index: int) -> sandbox.Policy:
        tier = "network" if manifest.side_effect == "network" else self.tier
        home = self.dir / manifest.name
        home.mkdir(mode=0o700, exist_ok=True)
        uid = None
        if "identity" in sandbox.TIERS[tier]:
            leases = self.procs.sandboxes.leases
            uid = sandbox.allocate_uid(
                index, base=self.config.tool_uid_base, size=1000, skip_busy=True,
                take=lambda uid: leases.take(uid, ("tool", manifest.name, index)))
            sandbox.prepare_home(home, uid, uid)
        reads = (str(self.state.agents),) if manifest.reads_caller_files else ()
        return tool_policy(tier, home, tool_file, uid=uid, readable=reads)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for name, command in self.config.mcp_servers.items():
            try:
                self._mount(name, list(command), network=False, call=None)
            except Exception as exc:  # a bad entry must not stop the kernel from booting
                log.error("mcp mount failed", extra={"mount": name, "reason": str(exc)})

    def stop(self) -> None:
        for pending in list(self.inflight):
            assert pending.job is not None
            pending.job.cancel()  # workers kill their processes and return at once
        for tool in self.tools.values():
            if tool.pool is not None:
                tool.pool.stop()
        self.stopping = True  # mounts ending now are not restarted
        for mount in self.mounts.values():
            mount.stop()

    # --- syscalls ----------------------------------------------------------------------------

    def list(self) -> list[abi.ToolSpec]:
        return [abi.ToolSpec(name=m.name, description=m.description, parameters=m.parameters,
                             side_effect=m.side_effect, concurrency=m.concurrency,
                             timeout_s=m.timeout_s, source=m.source, result=m.result,
                             resources=m.resources)
                for m in (t.manifest for t in self.tools.values())]

    def call(self, call: Call, args: abi.ToolCallArgs) -> Any:
        tool = self.tools.get(args.name)
        if tool is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no tool {args.name!r}")
        m = tool.manifest
        problem = m.check_args(args.arguments)
        if problem is not None:
            raise Fault(abi.ErrorCode.EINVAL, problem)
        if self.calls.draining:
            raise Fault(abi.ErrorCode.EAGAIN, "the kernel is shutting down")
        if tool.pool is not None and self.sandbox_error is not None:
            raise Fault(abi.ErrorCode.EIO, f"tools cannot run: {self.sandbox_error}")
        arguments = dict(args.arguments)
        resources = self._authorise(call, m, arguments)
        pending = Pending(call, tool, arguments, self._ctx(call.caller, m), time.monotonic())

        def proceed() -> None:
            call.on_cancel.append(lambda: self._cancel(pending))
            keys = tuple(resources) or ((f"tool/{m.name}",) if m.exclusive else ())
            pending.lock = self.locks.acquire(keys, m.exclusive, lambda: self._admit(pending))

        if m.side_effect == "destructive":
            self.approvals.destructive_tool(call, m.name, args.arguments, proceed)
        else:
            proceed()
        self.calls.counts[f"tools.tool.{m.name}"] += 1
        if call.done:  # refused on the way in (e.g. its mount went away): nothing to park
            return PENDING
        self.calls.offload(call)
        return self.calls.park(call, call.timeout_ms)

    def mount(self, call: Call, args: abi.MountArgs) -> Any:
        if args.name in self.mounts:
            raise Fault(abi.ErrorCode.EBUSY, f"{args.name!r} is already mounted")
        try:
            self._mount(args.name, list(args.command), args.network, call)
        except ValueError as exc:
            raise Fault(abi.ErrorCode.EINVAL, str(exc)) from None
        return self.calls.park(call, call.timeout_ms)

    def unmount(self, call: Call, args: abi.ToolRef) -> None:
        if self.failed_mounts.pop(args.name, None) is not None:
            return  # a mount that failed: forget it
        mount = self.mounts.pop(args.name, None)
        if mount is None:
            raise Fault(abi.ErrorCode.ENOENT, f"nothing is mounted as {args.name!r}")
        self.mount_state.pop(args.name, None)
        self.mount_restarts.pop(args.name, None)
        for name in [n for n, t in self.tools.items() if t.mount is mount]:
            tool = self.tools.pop(name)
            for pending in list(tool.waiting):
                self.calls.fail(pending.call, abi.ErrorCode.ECANCELED, f"{args.name} was unmounted")
        # The session closes on the mount's own thread; in-flight calls end with ECANCELED.
        mount.close()
        self.audit.append(call.caller.principal, "tool-unmount", mount=args.name)

    def mount_info(self) -> list[abi.MountInfo]:
        return [abi.MountInfo(name=name, command=m.command, state=self.mount_state[name],
                              restarts=self.mount_restarts.get(name, 0),
                              tools=sorted(m.manifests) if self.mount_state[name] == "ready"
                              else [], error=m.error)
                for name, m in self.mounts.items()] + list(self.failed_mounts.values())

    # --- checks ------------------------------------------------------------------------------

    def _authorise(self, call: Call, m: Manifest, arguments: dict[str, Any]) -> list[str]:
        """The resources the call names, each covered by the caller's capability: `file/<path>`
        (the caller's own home needs no grant) and `net/HOST:PORT` (the endpoint grammar of
        `net.connect`, sdk/endpoints.py: a rule `net/*.example.org:443` or `net/10.0.0.0/8:*`).
        Network tools are refused unless a host is named and granted. Path arguments are
        rewritten to the absolute path that was checked, so the tool uses exactly what was
        authorised."""
        home = self._home(call.caller)
        resources = []
        for arg, kind in m.resources.items():
            value = arguments.get(arg)
            if not isinstance(value, str):
                continue
            if kind == "path":
                path = os.path.normpath(os.path.join(str(home) if home else "/", value))
                arguments[arg] = path
                resource = "file" + path
                if home is not None and (path == str(home) or path.startswith(f"{home}/")):
                    resources.append(resource)
                    continue
            else:
                resource = _endpoint(m.name, arg, kind, value)
            assert call.capability is not None
            reason = call.capability.check("tools.call", resource, call.caller.principal,
                                           time.time())
            if reason is not None:
                self.guard.deny(call.caller.principal, "tools.call", resource, reason,
                                  token_id=call.capability.token_id)
                raise Fault(abi.ErrorCode.EPERM, f"tools.call: {m.name} needs a capability for "
                            f"{resource} (tools.call@{resource}): {reason}")
            resources.append(resource)
        if m.side_effect == "network" and not resources:
            raise Fault(abi.ErrorCode.EPERM, f"tools.call: {m.name} is disabled unless a "
                        "capability names the host (tools.call@net/HOST:PORT)")
        return resources

    def _home(self, caller: Caller) -> Path | None:
        if caller.agent_id is None:
            return None
        return self.state.agents / str(caller.agent_id) / "home"

    def _ctx(self, caller: Caller, m: Manifest) -> dict[str, Any]:
        ctx: dict[str, Any] = {"agent": caller.principal, "agent_id": caller.agent_id}
        if m.reads_caller_files:
            home = self._home(caller)
            sources = [{"kind": "files", "path": str(home)}] if home is not None else []
            for fn in self.sources:
                sources += fn(caller)
            ctx["sources"] = sources
        return ctx

    # --- running -----------------------------------------------------------------------------

    def _admit(self, pending: Pending) -> None:
        """Its resources are held: run it now, or when the tool has a free slot."""
        tool = pending.tool
        if tool.mount is not None and self.mount_state.get(tool.mount.name) == "restarting":
            self.calls.fail(pending.call, abi.ErrorCode.EAGAIN, f"the MCP server of "
                        f"{tool.mount.name} died and is being restarted: try again soon")
            return
        if tool.mount is not None and self.mounts.get(tool.mount.name) is not tool.mount:
            self.calls.fail(pending.call, abi.ErrorCode.ECANCELED,
                        f"{tool.mount.name} was unmounted")  # while the call waited for a lock
            return
        if tool.running < tool.manifest.concurrency:
            self._start(pending)
        else:
            tool.waiting[pending] = None

    def _start(self, pending: Pending) -> None:
        tool, m = pending.tool, pending.tool.manifest
        tool.running += 1
        budget = m.timeout_s
        if pending.call.timeout_ms is not None:
            budget = min(budget, pending.call.timeout_ms / 1000
                         - (time.monotonic() - pending.arrived))
        ctx = {**pending.ctx, "deadline_s": round(max(budget, 0.0), 3)}
        job = Job(pending.arguments, ctx, time.monotonic() + budget,
                  done=lambda outcome: self.calls.post(lambda: self._finish(pending, outcome)))
        pending.job = job
        self.inflight.add(pending)
        if tool.pool is not None:
            tool.pool.submit(job, tool.running)
        else:
            assert tool.mount is not None
            tool.mount.call(tool.remote_name, job, budget)

    def _finish(self, pending: Pending, outcome: Outcome) -> None:
        if pending.finished:
            return
        pending.finished = True
        self.inflight.discard(pending)
        self._release(pending)
        call, m = pending.call, pending.tool.manifest
        if outcome.code is not None:
            self.calls.fail(call, abi.ErrorCode[outcome.code], f"{m.name}: {outcome.error}")
            return
        total = round((time.monotonic() - pending.arrived) * 1000, 3)
        self.calls.reply(call, abi.ToolResult(
            name=m.name, value=outcome.value if outcome.ok else None,
            error=None if outcome.ok else (outcome.error or "the tool failed"),
            stdout=outcome.stdout, tool_ms=outcome.tool_ms, total_ms=total))

    def _release(self, pending: Pending) -> None:
        tool = pending.tool
        if pending.job is not None:
            tool.running -= 1
            while tool.waiting and tool.running < tool.manifest.concurrency:
                self._start(tool.waiting.popitem(last=False)[0])
        if pending.lock is not None:
            self.locks.release(pending.lock)

    def _cancel(self, pending: Pending) -> None:
        """The call ended early (deadline, caller gone): stop the work and free what it holds."""
        if pending.finished:
            return
        if pending.job is not None:
            pending.job.cancel()  # the worker reports ECANCELED; _finish frees the slot
            return
        pending.finished = True
        pending.tool.waiting.pop(pending, None)
        self._release(pending)

    # --- MCP mounts --------------------------------------------------------------------------

    def _mount(self, name: str, command: list[str], network: bool, call: Call | None) -> None:
        home = self.dir / f"mcp-{name}"
        home.mkdir(mode=0o700, exist_ok=True)
        tier = "network" if network else (self.tier if self.sandbox_error is None else "none")
        if "identity" in sandbox.TIERS[tier]:
            tier = "confined"  # a mount's server runs without a uid of its own (see README)
        command = resolve_command(command)
        # The program's directory, and any file its arguments name (a server script).
        files = [a for a in command[1:] if os.path.isabs(a) and os.path.isfile(a)]
        reads = sandbox.default_readable(os.path.dirname(command[0]), str(RUNTIME), *files)
        policy = sandbox.Policy(tier=tier, home=str(home), readable=reads,
                                env={"HOME": str(home), "PATH": "/usr/bin:/bin",
                                     "LANG": "C.UTF-8"},
                                limits=sandbox.Limits(address_space=4 << 30, processes=None))
        mount = McpMount(name, command, policy, self.dir / f"mcp-{name}.log")
        mount.network = network  # type: ignore[attr-defined]  # for its restarts
        mount.on_end = lambda: self.calls.post(lambda: self._ended(mount))
        self.failed_mounts.pop(name, None)
        self.mounts[name] = mount
        self.mount_state[name] = "starting" if call is not None or name not in (
            self.mount_restarts) else "restarting"
        mount.start(lambda error: self.calls.post(lambda: self._mounted(mount, error, call)))
        log.info("mcp mount starting", extra={"mount": name, "command": command,
                                              "tier": tier})

    def _ended(self, mount: McpMount) -> None:
        """A mount's server ended. Unless it was unmounted, start it again after a backoff
        that doubles while it keeps dying soon after it started (its calls get EAGAIN
        meanwhile; `tools.mounts` shows it `restarting`)."""
        if self.stopping or self.mounts.get(mount.name) is not mount or self.mount_state.get(
                mount.name) not in ("ready", "restarting"):
            return  # unmounted, or it never came up (reported to the mounting call)
        c = self.config
        lasted = time.monotonic() - (mount.ready_at or time.monotonic())
        streak = 0 if lasted >= c.restart_window else self.mount_restarts.get(mount.name, 0)
        self.mount_restarts[mount.name] = streak + 1
        self.mount_state[mount.name] = "restarting"
        delay = min(c.restart_backoff_max, c.restart_backoff * 2 ** streak)
        log.warning("mcp server ended; restarting", extra={
            "mount": mount.name, "reason": mount.error, "in_s": delay, "streak": streak + 1})
        self.audit.append("kernel", "tool-restart", mount=mount.name, reason=mount.error)
        self.calls.after(delay, lambda: self._restart(mount))

    def _restart(self, old: McpMount) -> None:
        if self.mounts.get(old.name) is not old:
            return  # unmounted meanwhile
        try:
            self._mount(old.name, old.command, old.network, None)  # type: ignore[attr-defined]
        except (OSError, ValueError) as exc:
            log.error("mcp restart failed", extra={"mount": old.name, "reason": str(exc)})

    def _mounted(self, mount: McpMount, error: str | None, call: Call | None) -> None:
        if self.mounts.get(mount.name) is not mount:
            return  # unmounted while it started
        if (error is not None or mount.error is not None) and (
                mount.name in self.mount_restarts):
            return  # a restart that failed: `_ended` schedules the next try
        if error is not None or mount.error is not None:
            self.mounts.pop(mount.name, None)
            self.mount_state.pop(mount.name, None)
            self.failed_mounts[mount.name] = abi.MountInfo(
                name=mount.name, command=mount.command, state="failed",
                error=error or mount.error)
            log.error("mcp mount failed", extra={"mount": mount.name,
                                                 "reason": error or mount.error})
            if call is not None:
                # The command's fault, not the kernel's: it did not start an MCP server.
                self.calls.fail(call, abi.ErrorCode.EINVAL, f"mount {mount.name}: the command did "
                            f"not start an MCP server: {error or mount.error}")
            return
        clashes = sorted(n for n in set(mount.manifests) & set(self.tools)
                         if self.tools[n].mount is None or self.tools[n].mount.name != mount.name)
        if clashes:
            mount.close()
            self.mounts.pop(mount.name, None)
            self.mount_state.pop(mount.name, None)
            if call is not None:
                self.calls.fail(call, abi.ErrorCode.EBUSY,
                                f"tool names taken: {', '.join(clashes)}")
            return
        self.mount_state[mount.name] = "ready"
        prefix = f"{mount.name}."
        for name in [n for n, t in self.tools.items() if t.mount is not None
                     and t.mount.name == mount.name and n not in mount.manifests]:
            del self.tools[name]  # a restarted server no longer offers it
        for name, manifest in mount.manifests.items():
            self.tools[name] = Tool(manifest, mount=mount, remote_name=name[len(prefix):])
        log.info("mcp mount ready", extra={"mount": mount.name, "tools": sorted(mount.manifests)})
        if call is not None:
            self.audit.append(call.caller.principal, "tool-mount", mount=mount.name,
                                command=mount.command)
            self.calls.reply(call, sorted(mount.manifests))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _endpoint(tool: str, arg: str, kind: str, value: str) -> str:
    """The `net/HOST:PORT` resource a tool's `url` or `host` argument names, in the same
    grammar (and so under the same rules) as an agent's own `net.connect`. A bare host (no
    port) is `HOST:*`: only a rule allowing every port of it covers that."""
    try:
        if kind == "url":
            parts = urllib.parse.urlsplit(value)
            host = parts.hostname or ""
            port: int | str | None = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        else:
            host, port = value, "*"
            if value.rsplit(":", 1)[-1].isdigit() and not value.endswith("]"):
                host, port = endpoints.split(value)
        if not host or port is None:
            raise ValueError("it names no host and port")
        host = endpoints.canonical_host(host)
    except ValueError as exc:
        raise Fault(abi.ErrorCode.EINVAL, f"{tool}: {arg}: {exc}") from None
    return endpoints.resource(host, port)
