"""The syscall families a connection exposes as attributes (`conn.sys`, `conn.llm`, ...)."""

from sdk.ipc import Ipc
from sdk.llm import Llm
from sdk.proc import Proc
from sdk.system import System

__all__ = ["Ipc", "Llm", "Proc", "System"]
