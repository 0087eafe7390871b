"""The `caps`, `approvals` and `audit` syscall families, and offline attenuation of tokens."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence

from sdk import abi, tokens
from sdk.errors import InvalidArgument
from sdk.syscalls import Family


def attenuate(token: str, *, caps: Sequence[str] = (), ttl: float | None = None,
              budgets: Mapping[str, int] | None = None, once: bool = False,
              requires_approval: Sequence[str] = ()) -> str:
    """Narrow a token offline, without the kernel: append caveats to its HMAC chain.

    `caps` (rules `OP[@RESOURCE]`) limits it to those rights, `ttl` makes it expire, `budgets`
    (`calls`, `llm_tokens`, `tools`, `bytes`) caps what it may spend, `once` makes it work for
    one call. Caveats can be added but never removed, so the result is never wider. The kernel
    still accepts it only from its audience: use `caps.delegate` to hand rights to another agent.
    The token format and its limits are the kernel's own (`sdk.tokens`): a token it would refuse
    is refused here, with InvalidArgument.
    """
    new: list[tuple[str, object]] = []
    try:
        if caps:
            new.append(("allow", [tokens.Rule.parse(text) for text in caps]))
        if ttl is not None:
            new.append(("exp", time.time() + ttl))
        for kind, limit in (budgets or {}).items():
            new.append(("budget", [kind, int(limit), secrets.token_hex(8)]))
        if once:
            new.append(("once", secrets.token_hex(16)))
        if requires_approval:
            new.append(("requires_approval",
                        [tokens.Rule.parse(text) for text in requires_approval]))
        return tokens.attenuate(token, *new)
    except tokens.TokenError as exc:
        raise InvalidArgument(exc.reason) from None
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class Caps(Family):
    def delegate(self, to: str, caps: Sequence[str] = (), *, group: str | None = None,
                 ttl: float | None = None, budgets: Mapping[str, int] | None = None,
                 once: bool = False, requires_approval: Sequence[str] = (),
                 token: str | None = None) -> abi.Grant:
        """Mint a child of this connection's token (or of `token`, another one it holds) for
        `to` (an agent name, `agent:ID` or `user:UID`). The child keeps every restriction of its
        parent and adds these; asking for a right the parent lacks is EPERM. Revoking the
        parent revokes the child."""
        args = abi.DelegateArgs(to=to, caps=list(caps), group=group, ttl_s=ttl,
                                budgets=dict(budgets or {}), once=once,
                                requires_approval=list(requires_approval), token=token)
        return self._call("caps.delegate", args)

    def revoke(self, token_id: str) -> int:
        """Revoke a token and everything derived from it; returns how many were revoked."""
        return self._call("caps.revoke", abi.RevokeArgs(id=token_id))

    def inspect(self, token: str | None = None) -> abi.TokenInfo:
        """This connection's token (or `token`, which must be the caller's): caveats, budgets
        spent, revocation."""
        return self._call("caps.inspect", abi.InspectArgs(token=token))

    def list(self, subject: str | None = None, all: bool = False,
             limit: int = 1000) -> list[abi.TokenInfo]:
        return self._call("caps.list", abi.ListTokensArgs(subject=subject, all=all, limit=limit))

    def rotate(self) -> None:
        """Replace the kernel's token key: every token signed so far stops working."""
        return self._call("caps.rotate")

    def export(self, ttl: float = 300.0) -> abi.Exported:
        """An Ed25519-signed snapshot of this token for verifiers without the kernel's key."""
        return self._call("caps.export", abi.ExportArgs(ttl_s=ttl))


class Approvals(Family):
    def list(self) -> list[abi.ApprovalInfo]:
        return self._call("approvals.list")

    def approve(self, request_id: int) -> None:
        return self._call("approvals.approve", abi.ApprovalRef(id=request_id))

    def deny(self, request_id: int, reason: str = "") -> None:
        return self._call("approvals.deny", abi.ApprovalRef(id=request_id, reason=reason))


class Audit(Family):
    def read(self, since: int = 0, limit: int = 1000) -> list[abi.AuditRecord]:
        return self._call("audit.read", abi.AuditArgs(since=since, limit=limit))

    def verify(self, full: bool = True) -> abi.AuditReport:
        """Check the audit chain and its anchor. `full=False` checks only the rows added since
        the last intact verify (fast on a long log; blind to older rows edited in place)."""
        return self._call("audit.verify", abi.AuditVerifyArgs(full=full))
