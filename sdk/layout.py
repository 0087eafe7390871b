"""Where a kernel's files live: the one contract between the kernel and its local clients."""

from __future__ import annotations

import os
from pathlib import Path

ENV_STATE_DIR = "AGENTOS_STATE_DIR"
ENV_CONFIG = "AGENTOS_CONFIG"  # the kernel's config file, when --config is not given
ENV_ENDPOINT = "AGENTOS_ENDPOINT"
ENV_TOKEN = "AGENTOS_TOKEN"
ENV_AGENT_ID = "AGENTOS_AGENT_ID"
ENV_AGENT_NAME = "AGENTOS_AGENT_NAME"
ENV_MODEL = "AGENTOS_MODEL"  # the model llm.chat asks for when the call names none
ENV_RINGS = "AGENTOS_RINGS"  # the agent's RingSpec (JSON), its fds inherited

# sun_path holds 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107


def default_state_dir() -> Path:
    """`/var/lib/agentos` for root, else `$XDG_STATE_HOME/agentos` (`~/.local/state/agentos`)."""
    if os.geteuid() == 0:
        return Path("/var/lib/agentos")
    home = os.path.expanduser("~")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return Path(base) / "agentos"


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state dir a command should use: the flag, then `$AGENTOS_STATE_DIR`, then the default."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser().absolute()
    return default_state_dir()


def run_dir(state: Path) -> Path:
    return state / "run"


def socket_path(state: Path) -> Path:
    return run_dir(state) / "kernel.sock"


def endpoint(state: Path) -> str:
    return f"ipc://{socket_path(state)}"


def admin_token_path(state: Path) -> Path:
    return state / "admin.token"
