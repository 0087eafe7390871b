"""The syscall families a connection exposes as attributes (`conn.sys`, `conn.llm`, ...)."""

from sdk.caps import Approvals, Audit, Caps
from sdk.fs import Fs
from sdk.ipc import Ipc
from sdk.llm import Llm
from sdk.memory import Memory
from sdk.proc import Proc
from sdk.system import System
from sdk.tools import Tools

__all__ = ["Approvals", "Audit", "Caps", "Fs", "Ipc", "Llm", "Memory", "Proc", "System",
           "Tools"]
