"""Handlers of the access manager's syscalls: `caps.*`, `approvals.*` and `audit.*`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kernel.access.audit import Verification
from kernel.access.export import export_token
from kernel.call import Call, Fault
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Kernel


def caps_delegate(k: Kernel, call: Call, args: abi.DelegateArgs) -> abi.Grant:
    return k.access.delegate(call, args)


def caps_revoke(k: Kernel, call: Call, args: abi.RevokeArgs) -> int:
    return k.access.revoke_call(call, args.id)


def caps_inspect(k: Kernel, call: Call, args: abi.InspectArgs) -> abi.TokenInfo:
    return k.access.inspect(call, args.token)


def caps_list(k: Kernel, call: Call, args: abi.ListTokensArgs) -> list[abi.TokenInfo]:
    return k.access.list(call, args)


def caps_rotate(k: Kernel, call: Call, args: abi.NoArgs) -> None:
    if call.caller.agent_id is not None:
        raise Fault(abi.ErrorCode.EPERM, "only users may rotate the token key")
    k.access.rotate_key(call.caller.principal)


def caps_export(k: Kernel, call: Call, args: abi.ExportArgs) -> abi.Exported:
    assert call.capability is not None
    token, public = export_token(k.state.root / "export.key", call.capability,
                                 call.caller.principal, args.ttl_s)
    k.audit.append(call.caller.principal, "export", token=call.capability.token_id,
                   ttl=args.ttl_s)
    return abi.Exported(token=token, public_key=public)


def approvals_list(k: Kernel, call: Call, args: abi.NoArgs) -> list[abi.ApprovalInfo]:
    return k.approvals.list()


def approvals_approve(k: Kernel, call: Call, args: abi.ApprovalRef) -> None:
    k.approvals.approve(call.caller, args.id)


def approvals_deny(k: Kernel, call: Call, args: abi.ApprovalRef) -> None:
    k.approvals.deny(call.caller, args.id, args.reason)


def audit_read(k: Kernel, call: Call, args: abi.AuditArgs) -> list[abi.AuditRecord]:
    return [abi.AuditRecord(**row) for row in k.audit.rows(args.since, args.limit)]


def audit_verify(k: Kernel, call: Call, args: abi.AuditVerifyArgs) -> Any:
    """Check the chain VERIFY_SLICE rows per loop turn, parked in between, so a long log
    delays the neighbours' calls by one slice at a time, not by the whole chain."""
    check = Verification(k.audit, full=args.full)

    def report() -> abi.AuditReport:
        rows = k.db.read("SELECT COUNT(*) FROM audit")[0][0]
        return abi.AuditReport(rows=rows, intact=check.broken is None, broken_at=check.broken,
                               anchored_seq=max(0, check.anchored_seq))

    if check.step():
        return report()

    def more() -> None:
        if call.done:  # timed out or cancelled meanwhile
            return
        if check.step():
            k.calls.reply(call, report())
        else:
            k.calls.after(0, more)

    k.calls.after(0, more)
    return k.calls.park(call, call.timeout_ms)
