"""Whether a destructive tool call may run: the one place such calls ask."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kernel.call import PENDING, Call

if TYPE_CHECKING:
    from kernel.core import Kernel


def approve(k: Kernel, call: Call, tool: str, arguments: Any,
            proceed: Callable[[], None]) -> None:
    """Let a destructive call run by calling `proceed`, now or once a human approves it.

    A tool listed in `tools_allow_destructive` runs at once, and so does a user's own call (the
    human is the one asking). An agent's call is held by the access manager's approval flow
    (`agentos approvals`, `approve ID`, `deny ID`): `proceed` runs on approval, a denial is
    EPERM, no answer within `approval_timeout` is ETIMEDOUT. Either way it is audited.
    """
    if tool in k.config.tools_allow_destructive or call.caller.agent_id is None:
        k.audit.append(call.caller.principal, "tool-destructive", tool=tool,
                       approved_by="config" if call.caller.agent_id is not None else "caller")
        proceed()
        return

    def approved() -> object:
        proceed()
        return PENDING  # the tool process answers the call

    k.approvals.gate(call, f"tools.call {tool}", {"tool": tool, "arguments": arguments},
                     approved)
