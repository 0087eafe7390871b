"""Whether a destructive tool call may run: the one place such calls ask."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Call, Kernel


def approve(k: Kernel, call: Call, tool: str, arguments: Any,
            proceed: Callable[[], None]) -> None:
    """Let a destructive call run by calling `proceed`, or refuse it with a Fault.

    This is the single call site of the access manager's approval flow: at merge it becomes
    `k.approvals.gate(call, "tools.call", detail, proceed)`, which asks a human (or a policy)
    and calls `proceed` once approved. Until then the answer is the configuration's: a tool
    listed in `tools_allow_destructive` runs, every other destructive tool is refused (EPERM).
    """
    from kernel.core import Fault

    if tool in k.config.tools_allow_destructive:
        k.audit.append(call.caller.principal, "tool-destructive", tool=tool,
                       approved_by="config")
        proceed()
        return
    raise Fault(abi.ErrorCode.EPERM, f"tools.call: {tool} is destructive and needs approval; "
                "none is configured (tools_allow_destructive)")
