"""The syscall families a connection exposes as attributes (`conn.sys`, `conn.proc`, ...)."""

from sdk.ipc import Ipc
from sdk.proc import Proc
from sdk.system import System

__all__ = ["Ipc", "Proc", "System"]
