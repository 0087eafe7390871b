"""The syscall families a connection exposes as attributes (`conn.sys`, `conn.llm`, ...)."""

from sdk.caps import Approvals, Audit, Caps
from sdk.ipc import Ipc
from sdk.llm import Llm
from sdk.proc import Proc
from sdk.system import System

__all__ = ["Approvals", "Audit", "Caps", "Ipc", "Llm", "Proc", "System"]
