"""The syscall families a connection exposes as attributes (`conn.sys`, `conn.llm`, ...)."""

from sdk.ipc import Ipc
from sdk.llm import Llm
from sdk.proc import Proc
from sdk.system import System
from sdk.tools import Tools

__all__ = ["Ipc", "Llm", "Proc", "System", "Tools"]
