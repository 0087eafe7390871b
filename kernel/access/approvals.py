"""The one approval gate: every operation a human must allow waits here, whichever room it is
in. Three things send a call to the gate:

- a `requires_approval` caveat on the caller's token that matches the call, for any syscall
  (`Kernel.execute` asks `guarded` after the access check, so every op the guard checks honours
  it the same way);
- an irreversible operation (deleting files or memories: `irreversible`) by an agent, while the
  kernel's `approve_irreversible` is on;
- a destructive tool (`destructive_tool`) called by an agent, unless the kernel's
  `tools_allow_destructive` names it.

`gate(call, action, detail, proceed)` parks `call` (the handler returns what `gate` returns,
`PENDING`) and lists the request in `agentos approvals`. Then exactly one of:

- `agentos approve ID`: `proceed()` runs on the loop thread, inside the approving syscall's
  transaction (in a savepoint of its own), and its return value becomes the call's result; a
  `Fault` it raises becomes the call's error. The requester's token is re-checked first: if it
  was revoked meanwhile the call fails with EPERM and `proceed` never runs.
- `agentos deny ID [--reason R]`: the call fails with EPERM.
- nobody answers within `approval_timeout` seconds (kernel config): the call fails with
  ETIMEDOUT.
- the requester dies or the kernel stops: the call is cancelled and the request dropped.

A call is asked about once: while an approved `proceed` runs, the gate lets the same call
through, so an op held by a caveat is not held again for being irreversible. `proceed` must
re-validate anything that may have changed while the call waited (the target may be gone).
Only users (people, through `agentos`) decide, never agents, and nobody can approve or deny
their own request: the principal that asked is refused with EPERM, whatever its rights.
Requests, decisions and refusals are audited; a request's id is the sequence number of its
audit record, so ids are never reused, even across restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kernel.call import PENDING, Call, Caller, Calls, Fault
from sdk import abi

if TYPE_CHECKING:
    from kernel.access.audit import AuditLog
    from kernel.access.manager import AccessManager
    from kernel.config import Config
    from kernel.db import Database

log = logging.getLogger("kernel.access")


@dataclass(eq=False)
class Request:
    id: int
    call: Call
    action: str
    detail: dict[str, Any]
    proceed: Callable[[], Any]
    requested_at: float
    deadline: float


class Approvals:
    def __init__(self, *, access: AccessManager, audit: AuditLog, calls: Calls, config: Config,
                 db: Database) -> None:
        self.access = access
        self.audit = audit
        self.calls = calls
        self.config = config
        self.db = db
        self.pending: dict[int, Request] = {}
        self._approved: Call | None = None  # the call whose approved `proceed` is running

    def guarded(self, call: Call, resource: str | None, proceed: Callable[[], Any]) -> Any:
        """Run `proceed` now, or hold it for approval if a `requires_approval` caveat of the
        caller's token matches the call."""
        cap = call.capability
        if cap is not None and any(rule.matches(call.name, resource)
                                   for rule in cap.approval_rules):
            return self.gate(call, call.name, {"resource": resource}, proceed)
        return proceed()

    def irreversible(self, call: Call, action: str, target: str,
                     proceed: Callable[[], Any]) -> Any:
        """An irreversible operation (a delete): an agent's is held for a human while the
        kernel's `approve_irreversible` is on; a user's own command is its approval. Either way
        it is audited. Returns `proceed`'s result, or PENDING while the call waits."""
        self.audit.append(call.caller.principal, "irreversible", call=call.name,
                            action=action, target=target)
        if call.caller.agent_id is not None and self.config.approve_irreversible:
            return self.gate(call, f"{call.name} {target}", {"target": target}, proceed)
        return proceed()

    def destructive_tool(self, call: Call, tool: str, arguments: Any,
                         proceed: Callable[[], None]) -> None:
        """Let a destructive tool call run by calling `proceed`, now or once a human approves
        it. A tool listed in `tools_allow_destructive` runs at once, and so does a user's own
        call (the human is the one asking); the tool process answers the call either way."""
        if tool in self.config.tools_allow_destructive or call.caller.agent_id is None:
            self.audit.append(call.caller.principal, "tool-destructive", tool=tool,
                                approved_by="config" if call.caller.agent_id is not None
                                else "caller")
            proceed()
            return

        def approved() -> object:
            proceed()
            return PENDING

        self.gate(call, f"tools.call {tool}", {"tool": tool, "arguments": arguments}, approved)

    def gate(self, call: Call, action: str, detail: dict[str, Any],
             proceed: Callable[[], Any], timeout: float | None = None) -> object:
        """Park `call` until a human approves (`proceed` runs), denies (EPERM) or the timeout
        (default: the kernel's `approval_timeout`) passes (ETIMEDOUT)."""
        if call is self._approved:
            return proceed()  # approved already, for this very call
        timeout = self.config.approval_timeout if timeout is None else timeout
        now = time.time()
        request_id = self.audit.append(call.caller.principal, "approval-request",
                                         action=action, detail=detail, timeout=timeout)
        req = Request(request_id, call, action, detail, proceed, now, now + timeout)
        self.pending[request_id] = req
        call.on_cancel.append(lambda: self.pending.pop(request_id, None))
        log.info("approval requested", extra={"request": request_id, "action": action,
                                              "principal": call.caller.principal})
        self.calls.after(timeout, lambda: self._expire(req))
        return self.calls.park(call, None)  # the approval's own timer bounds the wait

    def _expire(self, req: Request) -> None:
        if self.pending.pop(req.id, None) is not None:
            self.audit.append("kernel", "approval-timeout", request=req.id, action=req.action)
            waited = req.deadline - req.requested_at
            self.calls.fail(req.call, abi.ErrorCode.ETIMEDOUT,
                        f"{req.action}: nobody approved it within {waited:g} s")

    def list(self) -> list[abi.ApprovalInfo]:
        return [abi.ApprovalInfo(id=r.id, principal=r.call.caller.principal, action=r.action,
                                 detail=r.detail, requested_at=r.requested_at, deadline=r.deadline)
                for r in sorted(self.pending.values(), key=lambda r: r.id)]

    def _take(self, approver: Caller, request_id: int, verdict: str) -> Request:
        req = self.pending.get(request_id)
        if req is None:
            raise Fault(abi.ErrorCode.ENOENT, f"no pending approval {request_id}")
        if approver.agent_id is not None:
            # Approval is a human's act: agents, whatever their rights, never decide.
            raise Fault(abi.ErrorCode.EPERM, f"only a user may {verdict} a request; "
                        f"{approver.principal} is an agent")
        if approver.principal == req.call.caller.principal:
            self.audit.append(approver.principal, "approval-refused", request=request_id,
                                reason="own request")
            raise Fault(abi.ErrorCode.EPERM, f"{approver.principal} cannot {verdict} its own "
                        "request")
        del self.pending[request_id]
        return req

    def approve(self, approver: Caller, request_id: int) -> None:
        req = self._take(approver, request_id, "approve")
        self.audit.append(approver.principal, "approve", request=request_id, action=req.action,
                            requester=req.call.caller.principal)
        cap = req.call.capability
        if cap is not None and self.access.is_revoked(cap.token_id):
            self.calls.fail(req.call, abi.ErrorCode.EPERM, f"{req.action}: token revoked while "
                        "waiting for approval")
            return
        self._run(req)

    def deny(self, approver: Caller, request_id: int, reason: str) -> None:
        req = self._take(approver, request_id, "deny")
        self.audit.append(approver.principal, "deny-approval", request=request_id,
                            action=req.action, requester=req.call.caller.principal, reason=reason)
        self.calls.fail(req.call, abi.ErrorCode.EPERM,
                    f"{req.action}: denied by {approver.principal}" + (f": {reason}" if reason
                                                                        else ""))

    def _run(self, req: Request) -> None:
        """`proceed`, in a savepoint so a failure leaves none of its writes behind."""
        db = self.db
        db.write("SAVEPOINT approved")
        self._approved = req.call
        try:
            result = req.proceed()
        except Fault as exc:
            db.write("ROLLBACK TO approved")
            db.write("RELEASE approved")
            self.calls.fail(req.call, exc.code, exc.message)
            return
        except Exception:
            log.exception("approved operation failed", extra={"request": req.id})
            db.write("ROLLBACK TO approved")
            db.write("RELEASE approved")
            self.calls.fail(req.call, abi.ErrorCode.EIO, "internal kernel error (logged)")
            return
        finally:
            self._approved = None
        db.write("RELEASE approved")
        if result is not PENDING:
            self.calls.reply(req.call, result)
