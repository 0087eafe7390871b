"""The `caps`, `approvals` and `audit` syscall families, and offline attenuation of tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from sdk import abi
from sdk.errors import InvalidArgument
from sdk.syscalls import Family

_PREFIX = "aos1."


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def attenuate(token: str, *, caps: Sequence[str] = (), ttl: float | None = None,
              budgets: Mapping[str, int] | None = None, once: bool = False,
              requires_approval: Sequence[str] = ()) -> str:
    """Narrow a token offline, without the kernel: append caveats to its HMAC chain.

    `caps` (rules `OP[@RESOURCE]`) limits it to those rights, `ttl` makes it expire, `budgets`
    (`calls`, `llm_tokens`, `tools`, `bytes`) caps what it may spend, `once` makes it work for
    one call. Caveats can be added but never removed, so the result is never wider. The kernel
    still accepts it only from its audience: use `caps.delegate` to hand rights to another agent.
    """
    if not token.startswith(_PREFIX):
        raise InvalidArgument("not an aos1 token")
    body = token[len(_PREFIX):]
    try:
        key_id, ident, caveats, sig = msgspec.msgpack.decode(
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, TypeError, msgspec.DecodeError):
        raise InvalidArgument("malformed token") from None
    new: list[tuple[str, Any]] = []
    if caps:
        rules = []
        for text in caps:
            op, at, resource = text.partition("@")
            rules.append([op, resource if at else None])
        new.append(("allow", rules))
    if ttl is not None:
        new.append(("exp", float(time.time() + ttl)))
    for kind, limit in (budgets or {}).items():
        new.append(("budget", [kind, int(limit), secrets.token_hex(8)]))
    if once:
        new.append(("once", secrets.token_hex(16)))
    if requires_approval:
        held = [[op, resource if at else None]
                for op, at, resource in (text.partition("@") for text in requires_approval)]
        new.append(("requires_approval", held))
    for caveat in new:
        encoded = msgspec.msgpack.encode(caveat)
        caveats.append(encoded)
        sig = hmac.new(sig, encoded, hashlib.sha256).digest()
    return _PREFIX + _b64(msgspec.msgpack.encode((key_id, ident, caveats, sig)))


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

    def verify(self) -> abi.AuditReport:
        return self._call("audit.verify")
