"""The access check every syscall passes: verify the token, check its caveats against the
call, its resource and the caller's attested principal, then its kernel-side state (revocation,
one-shot, budgets: kernel/access/manager.py). Denials are audited (rate-limited per
principal, so a flood of forged tokens cannot turn into a flood of fsyncs)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kernel.access.rules import Capability
from kernel.call import Caller, Fault
from sdk.abi import ErrorCode
from sdk.tokens import TokenError

if TYPE_CHECKING:
    from kernel.access.audit import AuditLog
    from kernel.access.manager import AccessManager
    from kernel.config import Config

log = logging.getLogger("kernel.access")


class Guard:
    def __init__(self, *, access: AccessManager, audit: AuditLog, config: Config) -> None:
        self.access = access
        self.audit = audit
        self.config = config
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, last refill)
        self.suppressed = 0

    def check(self, token: str | Capability, op: str, resource: str | None,
              caller: Caller) -> Capability:
        """The verified capability, or a `Fault(EPERM)` naming the reason. A door that
        verified the token already (the HTTP door) passes its `Capability`: its caveats and
        kernel-side state are checked here all the same."""
        if type(token) is Capability:
            cap = token
        else:
            try:
                cap = self.access.authority.verify(token)
            except TokenError as exc:
                self.deny(caller.principal, op, resource, f"invalid token: {exc.reason}")
                raise Fault(ErrorCode.EPERM, f"invalid token: {exc.reason}") from None
        reason = cap.check(op, resource, caller.principal, time.time())
        if reason is not None:
            self.deny(caller.principal, op, resource, reason, token_id=cap.token_id)
            raise Fault(ErrorCode.EPERM, f"{op}: {reason}")
        try:
            self.access.admit(cap, op)  # revocation, one-shot, budgets
        except Fault as exc:
            self.deny(caller.principal, op, resource, exc.message, token_id=cap.token_id)
            raise
        return cap

    def deny(self, principal: str, op: str, resource: str | None, reason: str,
             token_id: str | None = None) -> None:
        rate = self.config.audit_denials_per_s
        now = time.monotonic()
        tokens, last = self._buckets.get(principal, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1:
            self.suppressed += 1
            self._buckets[principal] = (tokens, now)
            return
        self._buckets[principal] = (tokens - 1, now)
        if len(self._buckets) > 10000:
            self._buckets.clear()
        log.warning("denied", extra={"principal": principal, "call": op, "resource": resource,
                                     "reason": reason})
        self.audit.append(principal, "deny", call=op, resource=resource, reason=reason,
                                 token=token_id, suppressed_before=self.suppressed)
        self.suppressed = 0
