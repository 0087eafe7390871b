"""How the kernel starts an agent inside its sandbox: tier, uid, home, endpoint, env, limits.

The process table decides *whether* to start an agent; this module turns an `AgentSpec` into a
sandbox `Policy` and the launcher command (kernel/proc/sandbox.py, launch.py), and owns the
per-agent endpoint: agents with a uid of their own reach the kernel only through
`run/agents/<id>/kernel.sock` (root:agent-gid 0660 in a 0710 directory), an extra endpoint of
the kernel's one ROUTER, so no agent can even connect to another agent's endpoint or the
admin one. Agents of tier `none` run as the kernel's uid and use the main socket.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.call import Fault
from kernel.proc import homes, resolve, sandbox, venvs
from kernel.proc.sandbox import Limits, Policy, SandboxUnavailable
from kernel.proc.uids import UidLeases
from sdk import abi, layout

if TYPE_CHECKING:
    import zmq

    from kernel.access.audit import AuditLog
    from kernel.config import Config
    from kernel.db import Database
    from kernel.doors.egress import Egress
    from kernel.doors.http.agentdoor import AgentDoor
    from kernel.state import StateDir

log = logging.getLogger("kernel.proc")

STRENGTH = {"none": 0, "standard": 1, "strict": 2}
RESTART_POLICIES = ("no", "on-failure", "always")
LOG_LIMIT = "log_bytes"  # spawn limits that are not rlimits: the captured streams' cap,
HOME_LIMIT = "home_bytes"  # and the home's quota (0: none)
LIMIT_NAMES = frozenset({f.name for f in dataclasses.fields(Limits)} | {LOG_LIMIT, HOME_LIMIT})
_ENV_PASSTHROUGH = ("LANG", "LC_ALL", "TZ")
_PATH = "/usr/local/bin:/usr/bin:/bin"
# Pins of paths only root can change, reused this long (kernel/proc/resolve.py pin_trusted);
# at most this many kept.
PIN_TTL, PINS_CACHED = 2.0, 256
# Set to an agent's default model (`agentos run --model`): the SDK's, the common convention's
# and the OpenAI Agents SDK's variable.
MODEL_ENV = (layout.ENV_MODEL, "OPENAI_MODEL", "OPENAI_DEFAULT_MODEL")
# The project root, so an agent finds `sdk` even when agentos runs from a source checkout.
SDK_ROOT = str(Path(sandbox.PROJECT_ROOT))


@dataclass
class AgentSpec:
    """Everything a start needs. It is kept in the agent's row, so a restart (or a new kernel
    reconciling the table) starts the same agent again."""

    agent_id: int
    name: str
    path: str
    argv: list[str]
    caps: list[str]
    tier: str
    limits: dict[str, int]  # overrides of the kernel's defaults, by LIMIT_NAMES
    restart: str = "no"
    group: str | None = None  # a privilege group whose template is granted at every start
    spawned_by: str = ""  # the principal that started it: what its code must be within reach of
    model: str | None = None  # its default model, as asked for (a served name or an alias)
    venv: str | None = None  # the real path of the virtual environment that runs it


@dataclass
class Extras:
    """What other subsystems hand an agent at start (the syscall rings): fds the agent inherits
    at the same numbers and environment entries. Spawn hooks fill it; reap hooks undo it."""

    fds: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


SpawnHook = Callable[[int, Extras], None]


@dataclass
class Prepared:
    """A start ready to exec: the launcher and what the process table must remember."""

    launch: sandbox.Launch
    policy: Policy
    endpoint: str  # what the agent connects to
    socket_dir: Path | None  # its own endpoint's directory, if it has one
    log_bytes: int


class Sandboxes:
    def __init__(self, *, audit: AuditLog, config: Config, db: Database,
                 state: StateDir) -> None:
        self.audit, self.config, self.db, self.state = audit, config, db, state
        # The doors that serve each agent on its own sockets; the kernel builds them after the
        # process table (they attest peers through it) and hands them over with `attach`.
        self.router: zmq.Socket | None = None
        self.agentdoor: AgentDoor | None = None
        self.egress: Egress | None = None
        self.probe = sandbox.probe()
        self.agent_uids = range(config.agent_uid_base,
                                config.agent_uid_base + config.agent_uid_count)
        self.quota_missing = homes.unavailable()
        self.leases = UidLeases()  # host-wide: no other kernel's agent shares a uid with ours
        # Agents with uids of their own while they run: their uid and home, for the reap.
        self._started: dict[int, tuple[int, Path]] = {}
        self.spares: homes.Spares | None = None  # formatted home images, from the first home
        self._keys: dict[int, str] = {}  # the door/proxy key of agents being started
        self._pins: dict[str, tuple[list[int], float]] = {}  # path -> (pin, until)
        if self.can_isolate and self.quota_missing is None:
            stale = homes.detach_stale(state.agents)
            if stale:
                log.warning("unmounted homes a previous kernel left", extra={"count": len(stale)})

    def attach(self, *, router: zmq.Socket, agentdoor: AgentDoor, egress: Egress) -> None:
        """The ROUTER that binds each agent's `kernel.sock`, and the two services that serve
        each agent on a socket of its own: its OpenAI door and its egress proxy."""
        self.router, self.agentdoor, self.egress = router, agentdoor, egress

    @property
    def can_isolate(self) -> bool:
        """Whether agents can get uids of their own (the kernel is root)."""
        return "identity" not in self.probe.missing

    def available(self) -> list[str]:
        tiers = []
        for tier in sandbox.TIERS:
            try:
                sandbox.plan(tier, self.probe)
            except SandboxUnavailable:
                continue
            tiers.append(tier)
        return tiers

    # --- deciding ----------------------------------------------------------------------------

    def tier(self, requested: str | None, caller_tier: str | None) -> str:
        """The tier to start in: the request, else the kernel's default (never weaker than the
        spawning agent's own); refused (ENOSYS) when this machine cannot apply it."""
        tier = requested or self.config.sandbox
        if requested is None and caller_tier is not None and (
                STRENGTH[caller_tier] > STRENGTH[tier]):
            tier = caller_tier
        if caller_tier is not None and STRENGTH[tier] < STRENGTH[caller_tier]:
            raise Fault(abi.ErrorCode.EPERM, f"an agent in the {caller_tier} sandbox cannot "
                        f"start one in the weaker {tier} tier")
        try:
            sandbox.plan(tier, self.probe)
        except SandboxUnavailable as exc:
            raise Fault(abi.ErrorCode.ENOSYS, str(exc)) from None
        return tier

    def limits(self, requested: dict[str, int], caller: dict[str, int] | None) -> dict[str, int]:
        """Validated overrides; a spawning agent cannot give its child more than it has."""
        unknown = sorted(set(requested) - LIMIT_NAMES)
        if unknown:
            raise Fault(abi.ErrorCode.EINVAL, f"unknown limits {', '.join(unknown)} (known: "
                        f"{', '.join(sorted(LIMIT_NAMES))})")
        if "tmp_bytes" in requested and requested["tmp_bytes"] <= 0:
            raise Fault(abi.ErrorCode.EINVAL, "tmp_bytes must be positive")
        if "nice" in requested and not 0 <= requested["nice"] <= 19:
            raise Fault(abi.ErrorCode.EINVAL, "nice must be 0..19 (an agent never runs ahead "
                        "of the kernel)")
        if 0 < requested.get(HOME_LIMIT, 0) < homes.MIN_BYTES:
            raise Fault(abi.ErrorCode.EINVAL, f"home_bytes is 0 (no quota) or at least "
                        f"{homes.MIN_BYTES}")
        out = dict(requested)
        if caller is not None:
            mine, theirs = self.effective(caller), self.effective(requested)
            for name, cap in mine.items():
                want = theirs.get(name)
                if name == "nice":  # a larger value is less CPU: the child may only go nicer
                    if cap is not None and (want is None or want < cap):
                        if "nice" in requested:
                            raise Fault(abi.ErrorCode.EPERM, f"cannot give a child nice={want}"
                                        f": the caller's own is {cap}")
                        out["nice"] = cap  # not asked for: it inherits the caller's
                    continue
                if cap is not None and (want is None or want > cap):
                    raise Fault(abi.ErrorCode.EPERM, f"cannot give a child {name}={want}: the "
                                f"caller's own limit is {cap}")
        return out

    def effective(self, overrides: dict[str, int]) -> dict[str, int | None]:
        """The limits an agent runs with: Limits' defaults, the config's, then its own."""
        values: dict[str, int | None] = dataclasses.asdict(Limits())
        values[LOG_LIMIT] = self.config.log_bytes
        values[HOME_LIMIT] = self.config.home_bytes
        values.update(self.config.agent_limits)
        values.update(overrides)
        if not values[HOME_LIMIT]:
            values[HOME_LIMIT] = None  # no quota: more than any quota a parent could pass on
        return values

    def allocate_uid(self, agent_id: int, in_use: set[int]) -> int:
        """A uid leased host-wide for the agent until it is over (restarts keep it)."""
        return sandbox.allocate_uid(agent_id, self.config.agent_uid_base,
                                    self.config.agent_uid_count, in_use, skip_busy=True,
                                    take=lambda uid: self.leases.take(uid, agent_id))

    def claim_lost(self, agent_id: int, uid: int) -> bool:
        """A dead kernel's agent ran as `uid`: lease it again before killing what is left of
        it. False when another kernel on this host holds it now: its processes are that
        kernel's agent, not our leftovers."""
        return self.leases.take(uid, agent_id)

    # --- preparing ---------------------------------------------------------------------------

    def prepare(self, spec: AgentSpec, token: str, uid: int | None,
                extras: Extras) -> Prepared:
        """Home, endpoint, environment and policy for one start, and its launcher."""
        values = self.effective(spec.limits)
        log_bytes = int(values.pop(LOG_LIMIT) or 0)
        home_bytes = values.pop(HOME_LIMIT)
        limits = Limits(**values)  # type: ignore[arg-type]
        agent_dir = self.state.agent_dir(spec.agent_id, home=uid is None)
        home = agent_dir / "home"
        socket_dir = None
        if uid is None:
            endpoint = f"ipc://{self.state.socket_path}"
        else:
            sandbox.prepare_socket_dir(agent_dir, uid)
            sandbox.prepare_home(home, uid, uid)
            if home_bytes is not None:
                self.mount_home(home, home_bytes, uid)
            self._started[spec.agent_id] = (uid, home)
            try:
                self._reown(spec.agent_id, home, uid)
                socket_dir = self.bind_endpoint(spec.agent_id, uid)
            except BaseException:
                self.release(spec.agent_id)
                raise
            endpoint = f"ipc://{socket_dir / 'kernel.sock'}"
        env = {k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ}
        env.update({
            "HOME": str(home),
            "PATH": _PATH if uid is not None else os.environ.get("PATH", _PATH),
            "PYTHONPATH": SDK_ROOT,
            "PYTHONUNBUFFERED": "1",
            layout.ENV_ENDPOINT: endpoint,
            layout.ENV_TOKEN: token,
            layout.ENV_AGENT_ID: str(spec.agent_id),
            layout.ENV_AGENT_NAME: spec.name,
        })
        if uid is not None:
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # the code is read-only to the agent
            if spec.tier == "standard":
                env["TMPDIR"] = str(home)  # the host's /tmp is out of reach; strict has its own
        if spec.model is not None:
            # What the SDK (sdk/llm.py), scripts by convention, and the OpenAI Agents SDK read
            # as the model to ask for; the openai client and LangChain take it from the code.
            for name in MODEL_ENV:
                env[name] = spec.model
        forwards = self.bridge(spec, token, socket_dir, uid, env)
        env.update(extras.env)
        # spec.path is the code's real path, checked at this start (ProcessTable._check_code).
        code_dir = os.path.dirname(spec.path)
        python = self.config.agent_python or sys.executable
        try:
            # The kernel's own runtime stays readable under a venv: the SDK's dependencies
            # come from it (the venv's agentos-sdk.pth, userland/venvs.py).
            venv = (venvs.check(spec.venv, self.config, self.state.root, again=True)
                    if spec.venv else None)
            readable = (sandbox.default_readable(code_dir, *(venv.readable if venv else ()),
                                                 python=python) if uid is not None else ())
        except Fault:
            if socket_dir is not None:
                self.unbind_endpoint(socket_dir)
            self.release(spec.agent_id)
            raise
        except (OSError, subprocess.SubprocessError) as exc:
            if socket_dir is not None:
                self.unbind_endpoint(socket_dir)
            self.release(spec.agent_id)
            raise Fault(abi.ErrorCode.EINVAL, f"the agents' interpreter {python} does not run "
                        f"({exc}); fix agent_python in the kernel's config") from None
        try:
            pins = self.pins(spec.tier, (str(home), *readable))
        except OSError as exc:
            if socket_dir is not None:
                self.unbind_endpoint(socket_dir)
            self.release(spec.agent_id)
            raise Fault(abi.ErrorCode.EPERM, f"cannot sandbox this agent: {exc.strerror}") \
                from None
        if venv is not None:
            python = venv.python
            env["VIRTUAL_ENV"] = venv.path
            env["PATH"] = f"{venv.path}/bin:{env['PATH']}"
        policy = Policy(
            tier=spec.tier, uid=uid, gid=uid, home=str(home), readable=readable,
            socket_dir=str(socket_dir) if socket_dir else None, limits=limits,
            keep_fds=tuple(extras.fds), env=env, pins=pins, forwards=forwards)
        argv = [python, "-m", "sdk.runner", spec.path, *spec.argv]
        try:
            launch = sandbox.Launch(policy, argv)
        except ValueError as exc:
            if socket_dir is not None:
                self.unbind_endpoint(socket_dir)
            self.release(spec.agent_id)
            raise Fault(abi.ErrorCode.EINVAL, f"cannot sandbox this agent: {exc}") from None
        return Prepared(launch, policy, endpoint, socket_dir, log_bytes)

    def bridge(self, spec: AgentSpec, token: str, socket_dir: Path | None, uid: int | None,
               env: dict[str, str]) -> dict[str, str]:
        """The kernel's services inside the sandbox, on 127.0.0.1 of the agent's own network
        namespace, their addresses and key in the environment the agent's code starts with:
        the HTTP door (kernel/doors/http/agentdoor.py) and the egress proxy
        (kernel/doors/egress.py). The launcher binds their listeners in the namespace and
        hands them to the kernel (`adopt`), which serves them itself. The ports to bind, by
        service."""
        if socket_dir is None or uid is None or spec.tier not in ("strict", "standard"):
            return {}
        from kernel.proc.forward import PORTS
        from sdk.tokens import attenuate

        # Its own token narrowed to its own audience: worth nothing at any other door.
        key = attenuate(token, ("aud", f"agent:{spec.agent_id}"))
        forwards = {}
        if self.config.agent_door:
            url = f"http://127.0.0.1:{PORTS['door']}"
            env.update({"OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": key,
                        # AIOS's Cerebrum client sends no headers: the key rides in the path.
                        "AIOS_KERNEL_URL": f"{url}/aios/{key}"})
            forwards[str(PORTS["door"])] = "door"
        if self.config.egress:
            proxy = f"http://127.0.0.1:{PORTS['proxy']}"
            for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
                env[name] = env[name.lower()] = proxy
            # The door is on the namespace's own loopback: never through the proxy.
            env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
            forwards[str(PORTS["proxy"])] = "proxy"
        if forwards:
            self._keys[spec.agent_id] = key
        return forwards

    def adopt(self, agent_id: int, listeners: dict[str, int]) -> None:
        """Serve the listeners an agent's launcher bound in its namespace and handed over:
        whoever connects to them is in that namespace, so is the agent. Closes any it does
        not serve."""
        key = self._keys.pop(agent_id, None)
        for name, fd in list(listeners.items()):
            sock = socket.socket(fileno=fd)
            del listeners[name]
            if name == "door" and self.config.agent_door and self.agentdoor is not None:
                self.agentdoor.open(agent_id, sock)
            elif (name == "proxy" and self.config.egress and self.egress is not None
                  and key is not None):
                self.egress.open(agent_id, sock, key)
            else:
                sock.close()

    def pins(self, tier: str, paths: tuple[str, ...]) -> dict[str, list[int]]:
        """What each path Landlock will grant is now, reached as the launcher will reach it
        (no symlink an agent could have planted): the launcher grants only these files, so
        a path swapped after this check (for a symlink to `/`, say) is refused, whoever
        resolves it, the launcher or bubblewrap. A path only root could change (the system's
        and the runtime's, not a home) is walked again after PIN_TTL seconds, not at every
        spawn."""
        if "landlock" not in sandbox.TIERS[tier]:
            return {}
        now = time.monotonic()
        pins = {}
        for path in paths:
            cached = self._pins.get(path)
            if cached is not None and cached[1] > now:
                pins[path] = cached[0]
                continue
            pins[path], trusted = resolve.pin_trusted(path)
            if trusted:
                if len(self._pins) >= PINS_CACHED:
                    self._pins.clear()
                self._pins[path] = (pins[path], now + PIN_TTL)
        return pins

    # --- homes and leftovers -----------------------------------------------------------------

    def mount_home(self, home: Path, size: int, uid: int) -> None:
        """The home on a filesystem of `size` bytes (kernel/proc/homes.py); refused, never
        started without it, where this machine cannot."""
        if self.quota_missing is not None:
            raise Fault(abi.ErrorCode.ENOSYS, f"home quota unavailable: {self.quota_missing}; "
                        "set home_bytes = 0 (config, or --limit home_bytes=0) to run agents "
                        "without one")
        if self.spares is None and size == self.config.home_bytes:
            self.spares = homes.Spares(self.state.root / "home-spares", size)
        try:
            homes.mount(home, size, uid, uid, self.spares)
        except OSError as exc:
            code = {errno.EDQUOT: abi.ErrorCode.EQUOTA,
                    errno.EINVAL: abi.ErrorCode.EINVAL}.get(exc.errno or 0, abi.ErrorCode.EIO)
            log.error("home quota failed", extra={"home": str(home), "error": str(exc)})
            raise Fault(code, f"home {home}: {exc.strerror}") from None

    def _reown(self, agent_id: int, home: Path, uid: int) -> None:
        """A restart under another uid than its last run (that one still busy on the host)
        finds its files its own again."""
        rows = self.db.read("SELECT uid FROM agents WHERE id=?", (agent_id,))
        previous = rows[0][0] if rows else None
        if previous is not None and previous != uid:
            changed = homes.reown(home, previous, uid)
            log.info("home handed to the agent's new uid",
                     extra={"agent": agent_id, "from_uid": previous, "uid": uid,
                            "files": changed})

    def release(self, agent_id: int) -> None:
        """A reap hook, run once every process of the agent's uid is dead: the SysV IPC objects
        its uid left in the host's namespace are removed (counted, logged and audited), and
        its home is locked down and unmounted until a restart mounts it again."""
        started = self._started.pop(agent_id, None)
        if started is None:
            return
        uid, home = started
        self._remove_sysv(agent_id, uid)
        try:
            if homes.is_mounted(home):
                used, quota = homes.usage(home)
                if used >= quota * 0.95:
                    log.warning("an agent filled its home", extra={
                        "agent": agent_id, "used": used, "quota": quota})
            homes.lock_down(home)
        except OSError as exc:
            log.error("could not lock down a home", extra={"agent": agent_id, "error": str(exc)})

    def _remove_sysv(self, agent_id: int, uid: int) -> None:
        try:
            removed = sandbox.remove_sysv_objects(uid)
        except OSError as exc:
            log.error("could not list SysV IPC objects", extra={"error": str(exc)})
            return
        if removed:
            log.warning("removed SysV IPC objects of an agent's uid",
                        extra={"agent": agent_id, "uid": uid, "removed": removed})
            self.audit.append("kernel", "sysv-removed", agent=agent_id, uid=uid, **removed)

    def ended(self, agent_id: int, uid: int | None = None) -> None:
        """The agent is over for good (not restarting): its home is kept, locked down, or
        removed (`home_at_exit`). `uid`: of an agent a dead kernel lost, whose leftovers no
        reap of this kernel cleared."""
        if uid is not None and self.can_isolate and self.leases.held(uid):
            self._remove_sysv(agent_id, uid)
        rows = self.db.read("SELECT state FROM agents WHERE id=?", (agent_id,))
        if rows and rows[0][0] == "restarting":
            return  # stopped by a shutdown: the next kernel starts it again, home and all
        self.leases.release(agent_id)
        home = self.state.agents / str(agent_id) / "home"
        try:
            if self.config.home_at_exit == "remove":
                homes.remove(home)
            elif self.can_isolate:
                homes.lock_down(home)
        except OSError as exc:
            log.error("could not clear a home", extra={"agent": agent_id, "error": str(exc)})

    # --- per-agent endpoints -----------------------------------------------------------------

    def endpoints_dir(self) -> Path:
        return self.state.run / "agents"

    def bind_endpoint(self, agent_id: int, gid: int) -> Path:
        parent = self.endpoints_dir()
        parent.mkdir(mode=0o711, exist_ok=True)
        os.chmod(parent, 0o711)
        path = parent / str(agent_id)
        sock = path / "kernel.sock"
        if len(str(sock)) > layout.MAX_IPC_PATH:
            raise Fault(abi.ErrorCode.EINVAL, f"agent endpoint {sock} is longer than "
                        f"{layout.MAX_IPC_PATH} bytes; boot the kernel with a shorter state dir")
        sandbox.prepare_socket_dir(path, gid)
        if sock.exists() or sock.is_symlink():
            sock.unlink()  # a stale endpoint from a dead kernel
        self.router.bind(f"ipc://{sock}")
        os.chown(sock, os.geteuid(), gid, follow_symlinks=False)
        os.chmod(sock, 0o660)
        return path

    def unbind_endpoint(self, socket_dir: Path) -> None:
        if socket_dir.name.isdigit():
            self._keys.pop(int(socket_dir.name), None)
            self.agentdoor.close(int(socket_dir.name))
            self.egress.close(int(socket_dir.name))
        sock = socket_dir / "kernel.sock"
        try:
            self.router.unbind(f"ipc://{sock}")
        except Exception as exc:  # zmq.ZMQError: already gone; never fail a reap over it
            log.warning("unbind failed", extra={"endpoint": str(sock), "error": str(exc)})
        shutil.rmtree(socket_dir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {"available": self.available(), "missing": self.probe.missing,
                "default": self.config.sandbox, "landlock_abi": self.probe.landlock_abi,
                "home_quota": self.quota_missing or "ext4 image per home",
                "home_at_exit": self.config.home_at_exit}
