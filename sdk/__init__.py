"""agentos SDK: what an agent imports to make syscalls to the kernel (no torch, no kernel code)."""

from __future__ import annotations

import os
from pathlib import Path

from sdk import layout
from sdk.abi import (
    ABI_VERSION,
    AgentInfo,
    ChatDelta,
    ChatMessage,
    ChatResult,
    ErrorCode,
    LogChunk,
    Message,
    ModelInfo,
    Stats,
    ToolCall,
    ToolResult,
    ToolSpec,
)
from sdk.agent import Agent
from sdk.client import AsyncConnection, Connection
from sdk.errors import (
    Busy,
    Canceled,
    InvalidArgument,
    KernelFault,
    KernelUnavailable,
    NoSuchSyscall,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SyscallError,
    TimedOut,
    TryAgain,
)
from sdk.remote import CurveKeys

__all__ = [
    "ABI_VERSION",
    "Agent",
    "AgentInfo",
    "AsyncConnection",
    "Busy",
    "Canceled",
    "ChatDelta",
    "ChatMessage",
    "ChatResult",
    "Connection",
    "CurveKeys",
    "ErrorCode",
    "InvalidArgument",
    "KernelFault",
    "KernelUnavailable",
    "LogChunk",
    "Message",
    "ModelInfo",
    "NoSuchSyscall",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "Stats",
    "SyscallError",
    "TimedOut",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
    "TryAgain",
    "connect",
    "connect_async",
]


def _resolve(endpoint: str | None, token: str | None,
             state_dir: str | os.PathLike[str] | None) -> tuple[str, str]:
    """Explicit arguments win; then what the kernel put in an agent's environment; then, for
    local administrators, the state dir's socket and admin token."""
    endpoint = endpoint or (None if state_dir else os.environ.get(layout.ENV_ENDPOINT))
    token = token or (None if state_dir else os.environ.get(layout.ENV_TOKEN))
    state = layout.state_dir(state_dir)
    if endpoint is None:
        endpoint = layout.endpoint(state)
    if token is None:
        path = layout.admin_token_path(state)
        try:
            token = Path(path).read_text().strip()
        except FileNotFoundError:
            raise KernelUnavailable(
                f"no kernel has booted in {state} (no {path.name} there): start one with "
                "`agentos boot --daemon`, or name its state dir with --state-dir or "
                f"${layout.ENV_STATE_DIR}", code=ErrorCode.ENOENT) from None
        except PermissionError:
            raise PermissionDenied(f"cannot read {path}: run as the kernel's user") from None
    return endpoint, token


def _env_curve(endpoint: str) -> CurveKeys | None:
    return CurveKeys.from_env() if endpoint.startswith("tcp://") else None


def connect(endpoint: str | None = None, token: str | None = None, *,
            state_dir: str | os.PathLike[str] | None = None, timeout: float = 30.0,
            curve: CurveKeys | None = None, rings: bool = False) -> Connection:
    """A blocking connection to the kernel (`curve`: a remote kernel's tcp:// endpoint).
    Agents the kernel spawned use their shared-memory rings whatever `rings` says; another
    local process gets rings of its own with `rings=True` (worth it for many calls; a
    one-shot command would only pay for setting them up)."""
    endpoint, token = _resolve(endpoint, token, state_dir)
    return Connection(endpoint, token, timeout=timeout, curve=curve or _env_curve(endpoint),
                      rings=rings)


def connect_async(endpoint: str | None = None, token: str | None = None, *,
                  state_dir: str | os.PathLike[str] | None = None,
                  timeout: float = 30.0, curve: CurveKeys | None = None) -> AsyncConnection:
    """An asyncio connection to the kernel; use inside a running event loop."""
    endpoint, token = _resolve(endpoint, token, state_dir)
    return AsyncConnection(endpoint, token, timeout=timeout,
                           curve=curve or _env_curve(endpoint))
