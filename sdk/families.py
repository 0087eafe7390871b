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
           "Tools", "attach"]


def attach(conn: object) -> None:
    """Give `conn` (a connection, an asyncio one, or a batch: anything with `call`) its
    families as attributes."""
    conn.sys, conn.proc, conn.ipc, conn.llm = (  # type: ignore[attr-defined]
        System(conn), Proc(conn), Ipc(conn), Llm(conn))
    conn.caps, conn.approvals, conn.audit = (  # type: ignore[attr-defined]
        Caps(conn), Approvals(conn), Audit(conn))
    conn.memory, conn.fs, conn.tools = (  # type: ignore[attr-defined]
        Memory(conn), Fs(conn), Tools(conn))
