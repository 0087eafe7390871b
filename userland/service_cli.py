"""`agentos service`: the kernel as a hardened systemd service, with this checkout's own paths.

The unit is written from the table below, not copied from a fixed template: its paths (the
interpreter, the checkout, the model cache) are this machine's, so `systemd-analyze verify`
passes as installed, and every hardening directive it cannot use says why in a comment beside
it (docs/operations.md#as-a-system-service lists them). The kernel runs as root: per-agent
uids, bubblewrap's namespaces and loop-mounted homes need it; the capability bounding set
keeps only what those need (found by running the sandbox tests under `setpriv
--bounding-set`, docs/operations.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from userland.subcommand import subcommand

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "agentos.service"
CONFIG = Path("/etc/agentos/kernel.toml")
STATE_DIR = Path("/var/lib/agentos")
HOMES = ("/home", "/root", "/run/user")

# What a root kernel does with each capability it keeps; everything else leaves the bounding
# set, so no process of the service (agents included) can ever hold it.
CAPABILITIES = {
    "CAP_SETUID": "agents run as uids of their own (the launcher's setresuid, kill_uid)",
    "CAP_SETGID": "and with gids of their own",
    "CAP_SYS_ADMIN": "bubblewrap's and the standard tier's namespaces and mounts; loop-mounted "
                     "home quotas",
    "CAP_NET_ADMIN": "bringing up loopback in each agent's fresh network namespace",
    "CAP_SYS_CHROOT": "a prepared strict agent's one visit to the host's mount namespace "
                      "(setns) for its own paths",
    "CAP_CHOWN": "handing homes, endpoint directories and sockets to the agents' uids",
    "CAP_FOWNER": "locking down a home the agent owns when it ends",
    "CAP_DAC_OVERRIDE": "reaching into agents' 0700 homes (lock-down, re-owning at a restart)",
    "CAP_KILL": "killing tool processes, which run under uids of their own",
}
# Left out though the launcher asks bubblewrap for it: CAP_SYS_RESOURCE. Agents' rlimits only
# lower the kernel's own (LimitNOFILE= and LimitCORE= below bound what an agent may be given).

# Beyond systemd's @system-service, the kernel, bubblewrap and the launcher make mount, umount2,
# pivot_root (@mount), sethostname, seccomp and Landlock's three: every syscall `strace -f -c`
# saw over the sandbox, homes, lifecycle and tool tests is in this set (docs/operations.md).
SYSCALLS = ("@system-service @mount sethostname seccomp landlock_create_ruleset "
            "landlock_add_rule landlock_restrict_self")
DENIED_SYSCALLS = "~@clock @cpu-emulation @debug @module @obsolete @raw-io @reboot @swap"


@dataclass
class Service:
    """What the unit is written from."""

    python: str
    root: str
    state_dir: str
    config: str
    model_dir: str
    protect_home: str = "read-only"
    user: str | None = None

    @property
    def root_kernel(self) -> bool:
        return self.user in (None, "root")

    def needs_homes(self) -> list[str]:
        """The paths the kernel reads that lie under a home directory."""
        paths = (self.python, os.path.realpath(self.python), self.root, self.model_dir,
                 self.state_dir, self.config)
        return [p for p in dict.fromkeys(paths) if any(
            p == h or p.startswith(h + "/") for h in HOMES)]


def _lines(*entries: tuple[str, str, str | None]) -> list[str]:
    """`Key=value` lines, each relaxed one after a comment saying why."""
    out = []
    for key, value, why in entries:
        if why:
            out.append(f"# {why}")
        out.append(f"{key}={value}")
    return out


def render(s: Service) -> str:
    """The unit file's text."""
    state = Path(s.state_dir)
    exec_start = (f"{s.python} -m kernel --state-dir {s.state_dir} --config {s.config} "
                  "--log-format json")
    lines = [
        "# The agentos kernel as a system service, written by `agentos service install`",
        "# (docs/operations.md#as-a-system-service). Edit the config file, not this unit;",
        "# re-run the installer after moving the checkout or its virtual environment.",
        "[Unit]",
        "Description=agentos kernel (operating system for LLM agents)",
        f"Documentation=file://{s.root}/docs/operations.md",
        "After=network.target",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "# READY=1 after recovery, WATCHDOG=1 from the dispatch loop itself (a wedged loop stops",
        "# the pings and is killed with SIGABRT within WatchdogSec, then restarted; the fault",
        "# handler writes every thread's stack to the journal first), STOPPING=1 as it drains.",
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        f"ExecStart={exec_start}",
        f"WorkingDirectory={s.root}",
        f"Environment=AGENTOS_MODEL_DIR={s.model_dir}",
        "Environment=XDG_CACHE_HOME=/var/cache/agentos",
        "Environment=PYTHONFAULTHANDLER=1",
        "Environment=PYTHONDONTWRITEBYTECODE=1",
        "Restart=on-failure",
        "RestartSec=2",
        "# SIGTERM makes the kernel drain: agents get SIGTERM, then SIGKILL after their grace.",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "TimeoutStopSec=30",
    ]
    if s.user is not None:
        lines.append(f"User={s.user}")
    if state.parent == Path("/var/lib"):
        lines += _lines(("StateDirectory", state.name, None),
                        ("StateDirectoryMode", "0711" if s.root_kernel else "0700",
                         "agents of their own uids pass through (never list) the state dir"
                         if s.root_kernel else None))
    else:
        lines.append(f"ReadWritePaths={s.state_dir}")
    lines += [
        "CacheDirectory=agentos",
        "CacheDirectoryMode=0700",
        "UMask=0077",
        "# The kernel holds a few descriptors per agent (sockets, pidfds, rings, log pipes).",
        "LimitNOFILE=65536",
        "# A core dump would hold the key that signs every capability.",
        "LimitCORE=0",
        "",
        "# Hardening (`systemd-analyze security agentos`).",
        "NoNewPrivileges=yes",
    ]
    if s.root_kernel:
        lines += [
            "# Host-wide uid leases (/run/agentos/uids): kept across restarts, they are flocks.",
            "RuntimeDirectory=agentos",
            "RuntimeDirectoryMode=0700",
            "RuntimeDirectoryPreserve=yes",
            "# Root, with only what per-agent uids, bubblewrap and loop-mounted homes need:",
            *(f"#   {cap}: {why}" for cap, why in CAPABILITIES.items()),
            "# (not CAP_SYS_RESOURCE: agents' rlimits only ever lower the kernel's own)",
            f"CapabilityBoundingSet={' '.join(CAPABILITIES)}",
        ]
    else:
        lines += [
            "# Not root: agents cannot get uids of their own, so only the `none` sandbox tier",
            "# works (docs/security.md); no capability at all.",
            "CapabilityBoundingSet=",
            "RemoveIPC=yes",
        ]
    lines += ["ProtectSystem=strict"]
    lines += _lines(("ProtectHome", s.protect_home,
                     None if s.protect_home == "yes" else
                     "agents' programs live in users' homes (`agentos run ~/agent.py`) and the "
                     "kernel reads them; --protect-home yes where none do"))
    lines += ["PrivateTmp=yes",
              "# Homes are loop-mounted in the service's own mount namespace: not on the host's.",
              "PrivateMounts=yes"]
    if s.root_kernel:
        lines += _lines(
            ("PrivateDevices", "no", "loop devices carry the agents' home quotas; the device "
                                     "policy below allows them and the basics, no more"),
            ("DevicePolicy", "closed", None),
            ("DeviceAllow", "/dev/loop-control rw", None),
            ("DeviceAllow", "block-loop rw", None),
        )
    else:
        lines += ["PrivateDevices=yes"]
    lines += [
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
    ]
    if s.root_kernel:
        lines += _lines(
            ("ProtectHostname", "no", "its seccomp filter denies sethostname to every child: "
                                      "bubblewrap names each sandbox (--hostname agent) in its "
                                      "own UTS namespace"),
            ("ProtectProc", "default", "the kernel finds its agents, other uids' processes, "
                                       "in /proc (invisible would hide them)"),
            ("ProcSubset", "all", "the kernel reads /proc/filesystems and /proc/sysvipc"),
            ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
             "AF_NETLINK: bubblewrap configures each sandbox's loopback over rtnetlink"),
            ("RestrictNamespaces", "mnt pid net ipc uts cgroup",
             "the sandboxes' namespaces (strict: bubblewrap's six; standard: ipc, net); "
             "user and time stay denied"),
        )
    else:
        lines += ["ProtectHostname=yes", "ProtectProc=invisible",
                  "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "RestrictNamespaces=yes"]
    lines += [
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        *_lines(("MemoryDenyWriteExecute", "no",
                 "inherited by every agent and tool: Node.js (MCP servers run by npx) and Java "
                 "abort under it (the kernel's own torch runs fine)")),
        *_lines(("PrivateNetwork", "no", "remote agents, the HTTP door, the agents' egress proxy "
                                         "and remote model servers are the network")),
        "SystemCallArchitectures=native",
        *_lines(("SystemCallFilter", SYSCALLS if s.root_kernel else "@system-service",
                 "bubblewrap and the homes need @mount and sethostname; the launcher seccomp "
                 "and Landlock"
                 if s.root_kernel else None)),
        f"SystemCallFilter={DENIED_SYSCALLS}",
        "SystemCallErrorNumber=EPERM",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def default_config(http: str | None, root_kernel: bool = True) -> str:
    listen = f'http = "{http}"' if http else '# http = "127.0.0.1:8000"   # the OpenAI/AIOS APIs'
    tier = ('sandbox = "strict"\n' if root_kernel else
            '# Not root: agents cannot get uids of their own, so no strict or standard tier.\n'
            'sandbox = "none"\n')
    return ("# The agentos kernel's configuration: a [kernel] table of kernel/config.py's fields,\n"
            "# [models.NAME] and [groups.NAME] tables (docs/operations.md). Written once by\n"
            "# `agentos service install`, never overwritten; `systemctl restart agentos` after\n"
            "# editing.\n"
            "[kernel]\n"
            f"{tier}"
            f"{listen}\n")


# --- install ---------------------------------------------------------------------------------


class InstallError(Exception):
    """Why the installer stopped, in the CLI's `CODE: message` form."""


def verify(text: str, name: str = UNIT_NAME) -> str | None:
    """What `systemd-analyze verify` says is wrong with the unit, or None (also when the tool
    is missing: then nothing is checked)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        done = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True,
                              timeout=60)
    # verify also reports on the unit's dependencies (other units' files); keep its own lines.
    own = [line for line in done.stderr.splitlines() if name in line]
    return "\n".join(own) if done.returncode != 0 or own else None


def _cannot_write(path: Path, exc: OSError) -> InstallError:
    code = errno.errorcode.get(exc.errno or 0, "EIO")
    return InstallError(f"{code}: cannot write {exc.filename or path} ({exc.strerror}); run it "
                        "as root, or give --unit-dir and --config elsewhere, or --print")


def _write(path: Path, text: str, mode: int, dry_run: bool, replace: bool = True) -> str:
    """Write `text` at `path` unless it is there already; what was done, in a few words."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    if old == text:
        return "unchanged"
    if old is not None and not replace:
        return "kept (it exists; the installer never overwrites a config)"
    if dry_run:
        return "would write" if old is None else "would replace"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    return "wrote" if old is None else "replaced"


def service_from(args: argparse.Namespace) -> Service:
    from sdk.models import default_root

    state = os.path.abspath(args.state_dir) if args.state_dir else str(STATE_DIR)
    model_dir = os.path.abspath(args.model_dir) if args.model_dir else str(default_root())
    s = Service(python=os.path.abspath(args.python or sys.executable), root=str(ROOT),
                state_dir=state, config=os.path.abspath(args.config or CONFIG),
                model_dir=model_dir, protect_home=args.protect_home, user=args.user)
    if s.protect_home in ("yes", "tmpfs") and s.needs_homes():
        raise InstallError(f"EINVAL: --protect-home {s.protect_home} would hide "
                           f"{', '.join(s.needs_homes())} from the kernel; keep read-only, or "
                           "move them (--model-dir, another venv)")
    return s


def cmd_install(args: argparse.Namespace) -> int:
    try:
        s = service_from(args)
        unit = render(s)
        if args.print:
            sys.stdout.write(unit)
            return 0
        problem = verify(unit)
        if problem:
            raise InstallError(f"EINVAL: systemd-analyze verify rejects the unit:\n{problem}")
        unit_path = Path(args.unit_dir) / UNIT_NAME
        config = Path(s.config)
        did_unit = _write(unit_path, unit, 0o644, args.dry_run)
        did_config = _write(config, default_config(args.http, s.root_kernel), 0o640,
                            args.dry_run, replace=False)
    except InstallError as exc:
        print(f"agentos: {exc}", file=sys.stderr)
        return 1
    print(f"unit    {unit_path}: {did_unit}")
    print(f"config  {config}: {did_config}")
    if args.http and did_config.startswith("kept"):
        print(f"agentos: note: --http was not applied: set http in {config}", file=sys.stderr)
    if not s.root_kernel and did_config.startswith("kept"):
        print("agentos: note: a kernel that is not root gives agents only the `none` sandbox "
              f"tier: set sandbox = \"none\" in {config}", file=sys.stderr)
    if not args.dry_run:
        print(f"next    systemctl daemon-reload && systemctl enable --now {UNIT_NAME}")
        print(f"logs    journalctl -u {UNIT_NAME} -f   (agents: AGENTOS_STATE_DIR={s.state_dir} "
              "agentos logs ID)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("service", help="run the kernel as a systemd service",
                        description="run the kernel as a systemd service")
    ssub = sp.add_subparsers(dest="service_command", required=True, metavar="COMMAND")
    ip = subcommand(ssub, "install", cmd_install,
                    "write a hardened systemd unit for this checkout (and a config file if "
                    "there is none); idempotent",
                    epilog="then: systemctl daemon-reload && systemctl enable --now agentos")
    ip.add_argument("--unit-dir", default=str(UNIT_DIR), metavar="DIR",
                    help=f"where the unit goes (default {UNIT_DIR})")
    ip.add_argument("--config", metavar="FILE",
                    help=f"the kernel's config file, written if missing (default {CONFIG})")
    ip.add_argument("--model-dir", metavar="DIR",
                    help="the model cache the service reads (default: this user's, "
                         "$AGENTOS_MODEL_DIR or ~/.cache/agentos/models)")
    ip.add_argument("--python", metavar="PATH",
                    help="the interpreter that runs the kernel (default: this one)")
    ip.add_argument("--http", metavar="HOST:PORT",
                    help="serve the HTTP APIs there (written into a new config file)")
    ip.add_argument("--protect-home", choices=("read-only", "yes", "tmpfs"),
                    default="read-only",
                    help="ProtectHome=: read-only (default) lets the kernel read agents' "
                         "programs in users' homes")
    ip.add_argument("--user", metavar="NAME",
                    help="run the kernel as this user, not root: no per-agent uids, so only "
                         "the `none` sandbox tier")
    ip.add_argument("--dry-run", action="store_true",
                    help="say what would be written, write nothing")
    ip.add_argument("--print", action="store_true", help="print the unit on stdout, write "
                                                         "nothing")
