"""`http.mint`: bearer tokens for the HTTP front end, never wider than the minter's own rights.

A key's subject and audience are `http:<name>`: the HTTP door accepts only such tokens and
presents their bearer as that principal, so the token's rules apply unchanged over HTTP and the
key is useless on the ZeroMQ socket (its audience is no agent and no local user). The token
records its minter's token as parent, ready for the access manager's revocation.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

from kernel.access.tokens import Rule, rules_cover
from sdk import abi

if TYPE_CHECKING:
    from kernel.core import Call, Kernel


def mint(k: Kernel, call: Call, args: abi.KeyArgs) -> str:
    from kernel.core import Fault
    from kernel.syscalls import known_op

    try:
        rules = [Rule.parse(text) for text in args.caps]
    except ValueError as exc:
        raise Fault(abi.ErrorCode.EINVAL, f"bad capability: {exc}") from None
    for rule in rules:
        if not known_op(rule.op):
            raise Fault(abi.ErrorCode.EINVAL, f"bad capability {rule}: no syscall {rule.op!r}")
    cap = call.capability
    assert cap is not None  # set by the access check before any handler runs
    if not all(rules_cover(held, rules) for held in cap.rule_sets):
        raise Fault(abi.ErrorCode.EPERM, "cannot grant rights the caller does not hold: "
                    + ", ".join(map(str, rules)))
    principal = f"http:{args.name or secrets.token_hex(4)}"
    expires_at = time.time() + args.ttl_s if args.ttl_s is not None else None
    token = k.authority.mint(principal, rules, expires_at=expires_at, parent_id=cap.token_id)
    k.procs.record_token(token)
    k.audit.append(call.caller.principal, "grant", subject=principal,
                   rules=[str(r) for r in rules], expires_at=expires_at, to="http")
    return token
