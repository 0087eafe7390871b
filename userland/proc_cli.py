"""`agentos suspend/resume`, and the sandbox flags of `agentos run` (--sandbox, --restart,
--limit, --model, and the agent's own environment: --requirements, --python, --venv)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_limit(text: str) -> tuple[str, int]:
    """`NAME=VALUE` with an optional K/M/G/T suffix (powers of 1024): `address_space=1G`."""
    name, sep, value = text.partition("=")
    match = re.fullmatch(r"(\d+)([kmgt]?)i?b?", value.strip().lower())
    if not sep or not name or match is None:
        raise argparse.ArgumentTypeError(f"bad limit {text!r}: want NAME=VALUE[K|M|G]")
    return name.strip(), int(match.group(1)) * _UNITS[match.group(2)]


def add_run_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--sandbox", choices=("none", "standard", "strict"),
                    help="sandbox tier (default: the kernel's, strict unless configured); a "
                         "tier this machine cannot apply is refused, never weakened")
    sp.add_argument("--restart", choices=("no", "on-failure", "always"), default="no",
                    help="restart it when it ends (with backoff, up to a crash-loop cap)")
    sp.add_argument("--limit", action="append", default=[], type=parse_limit,
                    metavar="NAME=VALUE",
                    help="per-agent limit (repeatable): address_space, cpu_seconds, open_files, "
                         "processes, file_size, tmp_bytes, log_bytes, home_bytes (0: no "
                         "quota); e.g. address_space=1G")
    sp.add_argument("--model", metavar="NAME",
                    help="the agent's default model (a served name or alias): set as "
                         "AGENTOS_MODEL, OPENAI_MODEL and OPENAI_DEFAULT_MODEL in its environment")
    sp.add_argument("--requirements", metavar="FILE", type=Path,
                    help="build (once, cached) a virtual environment with these requirements "
                         "and run the agent in it, read-only (default: requirements.txt or "
                         "pyproject.toml beside the agent, if any)")
    sp.add_argument("--python", metavar="PATH",
                    help="the interpreter to build that environment with (default: this one)")
    sp.add_argument("--venv", metavar="DIR",
                    help="run the agent in this virtual environment, built already")
    sp.add_argument("--no-venv", action="store_true",
                    help="ignore requirements.txt / pyproject.toml beside the agent")


def spawn_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"sandbox": args.sandbox, "restart": args.restart, "limits": dict(args.limit),
            "model": args.model, "venv": venv_for(args)}


def venv_for(args: argparse.Namespace) -> str | None:
    """The agent's virtual environment: --venv, or one built (or found built) for its
    requirements, with the build's progress on stderr. A BuildError stops `run` before the
    kernel is asked for anything."""
    from userland import venvs

    if args.venv:
        return str(Path(args.venv).expanduser().absolute())
    if args.no_venv and args.requirements is None:
        return None
    wanted = venvs.requirements_for(Path(args.path), args.requirements)
    if wanted is None:
        if args.python:
            raise venvs.BuildError("--python builds an environment: give --requirements too")
        return None
    text, cwd = wanted
    return str(venvs.build(text, cwd, args.python))


def cmd_suspend(args: argparse.Namespace) -> int:
    from userland.cli import _connect

    with _connect(args) as conn:
        conn.proc.suspend(args.id)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from userland.cli import _connect

    with _connect(args) as conn:
        conn.proc.resume(args.id)
    return 0


def add_commands(sub: Any) -> None:
    for name, fn, text in (
            ("suspend", cmd_suspend, "stop an agent (SIGSTOP) and hold its LLM requests"),
            ("resume", cmd_resume, "continue a suspended agent")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.set_defaults(fn=fn)
        sp.add_argument("id", type=int)
