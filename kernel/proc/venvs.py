"""Agents' own virtual environments: what the kernel checks before one runs an agent.

The kernel never builds an environment: building runs the packages' own code (setup.py, build
backends), and the kernel is root. The user builds it outside the sandbox, as themselves
(`agentos run --requirements`, userland/venvs.py); the kernel only accepts the directory, and
only where no agent can change it: not under the state dir (agents' homes are there), and
neither it nor a directory above it owned by anyone but root, the kernel's uid or an
`allowed_uids` user, or writable by anyone but its owner (a sticky directory such as /tmp
excepted above it). Inside the sandbox it is
bound read-only (strict) and granted read-only by Landlock (standard), so an agent's code never
writes to its own environment. Nothing in it is run here: its interpreter's paths are read from
the filesystem, not asked of the interpreter (which would run it as root).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kernel.call import Fault
from sdk import abi

if TYPE_CHECKING:
    from kernel.config import Config



@dataclass(frozen=True)
class Venv:
    path: str  # its real path
    python: str  # what runs the agent: PATH/bin/python
    readable: tuple[str, ...]  # what the sandbox must let the agent read: it, its interpreter


def check(path: str, config: Config, state_root: Path, *, again: bool = False) -> Venv:
    """The environment at `path`, if the kernel may run an agent in it; a typed Fault says why
    not. `again` (every start after the spawn): `path` is the real path stored then, and must
    still be, so no directory on it was swapped for a symlink since."""
    if not os.path.isabs(path):
        raise Fault(abi.ErrorCode.EINVAL, f"venv must be an absolute path, not {path!r}")
    real = os.path.realpath(path)
    if again and real != path:
        raise Fault(abi.ErrorCode.EPERM, f"venv {path} is now reached through a symlink")
    if not os.path.isfile(os.path.join(real, "pyvenv.cfg")):
        raise Fault(abi.ErrorCode.ENOENT, f"{path} is not a virtual environment (no pyvenv.cfg)")
    python = os.path.join(real, "bin", "python")
    base = os.path.realpath(python)
    if not (os.path.isfile(base) and os.access(base, os.X_OK)):
        raise Fault(abi.ErrorCode.ENOENT, f"venv {path} has no interpreter (bin/python)")
    root = os.path.realpath(state_root)
    if real == root or real.startswith(root + "/"):
        raise Fault(abi.ErrorCode.EPERM, f"venv {path} is inside the kernel's state dir, "
                    "where agents write")
    _not_writable_by_agents(real, config)
    # The interpreter's installation: its binary's directory and the prefix above it
    # (/usr/bin/python3.12 -> /usr; a uv- or pyenv-managed one -> its own tree).
    bindir = os.path.dirname(base)
    prefix = os.path.dirname(bindir)
    if prefix == "/":
        raise Fault(abi.ErrorCode.EINVAL, f"venv {path}: its interpreter {base} has no prefix")
    return Venv(real, python, (real, bindir, prefix))


def _not_writable_by_agents(path: str, config: Config) -> None:
    """Refuse `path` if anyone but the kernel's users could change it: owned by another uid
    (an agent's, a tool's, another local user's), or writable by group or others (directories
    above it may be sticky, as /tmp is). The top directories within are checked as well; what
    is deeper is the owner's (Landlock and the read-only bind keep every sandboxed process
    out)."""
    # Who may own it: the users who may use this kernel at all (root, the kernel's own uid,
    # `allowed_uids`), never another local user, an agent or a tool.
    owners = {0, os.geteuid(), *config.allowed_uids}

    inside = [os.path.join(path, name) for name in ("bin", "lib", "pyvenv.cfg")]
    above = [str(p) for p in Path(path).parents]
    for candidate, may_be_sticky in [*((p, False) for p in (path, *inside)),
                                     *((p, True) for p in above)]:
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        if st.st_uid not in owners:
            raise Fault(abi.ErrorCode.EPERM, f"venv {path}: {candidate} belongs to uid "
                        f"{st.st_uid}, not to root, the kernel's user or an allowed_uids user")
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not stat.S_ISLNK(st.st_mode)
        if writable and not (may_be_sticky and st.st_mode & stat.S_ISVTX):
            raise Fault(abi.ErrorCode.EPERM, f"venv {path}: {candidate} is writable by others "
                        f"than its owner (mode {stat.filemode(st.st_mode)})")
