"""The rule algebra: which requests a capability allows, and which rules may be granted from
the rules a holder has (`grantable`, the one subset rule every room asks through the access
manager). The token format these rules travel in is `sdk/tokens.py`."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

from sdk import endpoints
from sdk.tokens import OP_RE, Rule, Token, op_matches, resource_matches, resource_problem

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["CAVEAT_CHECKS", "Capability", "Request", "grantable", "rule_covers", "rules_cover"]

_PLAN_CACHE_SIZE = 256  # memoised request verdicts per capability


def _op_covers(parent: str, child: str) -> bool:
    if parent == "*" or parent == child:
        return True
    return parent.endswith(".*") and child != "*" and child.startswith(parent[:-1])


def _resource_covers(parent: str | None, child: str | None) -> bool:
    if parent is None:
        return True
    if child is None:
        return False
    if parent == "*":
        return True
    if child == "*":
        return False
    # Every resource the child prefix matches starts with the child prefix itself, and the child
    # prefix is one of them, so coverage is exactly "the parent matches the child prefix".
    return resource_matches(parent, child)


def rule_covers(parent: Rule, child: Rule) -> bool:
    """True iff every request that satisfies ``child`` also satisfies ``parent``."""
    return _op_covers(parent.op, child.op) and _resource_covers(parent.resource, child.resource)


def rules_cover(parent_rules: Iterable[Rule], child_rules: Iterable[Rule]) -> bool:
    """True iff every child rule is covered by some single parent rule.

    This is also exact against unions of parents: resource prefixes form trees, so a child
    prefix sits under a union of prefixes only if it sits under one of them.
    """
    parents = tuple(parent_rules)
    return all(any(rule_covers(p, c) for p in parents) for c in child_rules)


def grantable(held: Token, requested: Iterable[Rule]) -> bool:
    """Whether a holder of `held` may grant `requested`: every request the requested rules
    allow is allowed by each of the token's rule sets (a token's `allow` caveats all apply)."""
    rules = tuple(requested)
    return all(rules_cover(rule_set, rules) for rule_set in held.rule_sets)


# --------------------------------------------------------------------------- caveat checks


@dataclass(frozen=True, slots=True)
class Request:
    """What a caveat is checked against: one syscall by one connection at one moment."""

    op: str
    resource: str | None
    principal: str
    now: float


def _check_aud(audience: str, req: Request) -> str | None:
    return None if req.principal == audience else "audience mismatch"


def _check_allow(rules: tuple[Rule, ...], req: Request) -> str | None:
    if any(rule.matches(req.op, req.resource) for rule in rules):
        return None
    target = req.op if req.resource is None else f"{req.op}@{req.resource}"
    return f"not allowed: {target}"


def _check_exp(expires_at: float, req: Request) -> str | None:
    return None if req.now < expires_at else "expired"


def _check_nbf(not_before: float, req: Request) -> str | None:
    return None if req.now >= not_before else "not yet valid"


def _kernel_counted(value: Any, req: Request) -> str | None:
    # Budgets, one-shot nonces and approval requirements need kernel state: the access manager
    # (kernel/access/manager.py) and the approval gate (approvals.py) enforce them on every use.
    return None


# None if the caveat holds for the request, else the reason. One entry per kind the format
# knows (sdk.tokens.CAVEAT_FORMATS); a caveat of any other kind fails every check.
CAVEAT_CHECKS: Mapping[str, Callable[[Any, Request], str | None]] = MappingProxyType(
    {
        "aud": _check_aud,
        "allow": _check_allow,
        "exp": _check_exp,
        "nbf": _check_nbf,
        "budget": _kernel_counted,
        "once": _kernel_counted,
        "requires_approval": _kernel_counted,
    }
)

_Plan = tuple[tuple[tuple[str, object], ...], "str | None"]


@dataclass(frozen=True)
class Capability(Token):
    """A verified token, as the kernel checks it against each request."""

    def check(self, op: str, resource: str | None, principal: str, now: float) -> str | None:
        """None if every caveat holds for this request, else the reason it is refused.

        Only `exp` and `nbf` depend on the moment; the verdict of every other caveat is
        memoised per (op, resource, principal), so a token used again for the same request
        costs a dict lookup and its time checks.
        """
        key = (op, resource, principal)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(op, resource, principal)
            if len(self._plans) < _PLAN_CACHE_SIZE:
                self._plans[key] = plan
        timed, reason = plan
        for kind, value in timed:
            if kind == "exp" and not now < value:  # type: ignore[operator]
                return "expired"
            if kind == "nbf" and not now >= value:  # type: ignore[operator]
                return "not yet valid"
        return reason

    def names_ip(self, op: str, address: IPAddress, port: int) -> bool:
        """Whether the token allows `op` to `address`:`port` and one of its rules names the
        address by IP (sdk/endpoints.py `explicit_ip`): what a loopback, private or
        link-local address needs, where a name or `*` that resolves to it is not enough. Every
        rule set must allow the address (a set naming it cannot widen the others), one must
        name it (a narrowing that names it counts, under a parent's `*`)."""
        resource = endpoints.resource(str(address), port)
        n = len(endpoints.PREFIX)
        sets = self.rule_sets
        return all(any(r.matches(op, resource) for r in rules) for rules in sets) and any(
            op_matches(r.op, op) and r.resource is not None and r.resource.startswith(
                endpoints.PREFIX) and len(r.resource) > n
            and endpoints.explicit_ip(r.resource[n:], address, port)
            for rules in sets for r in rules)

    @cached_property
    def _plans(self) -> dict[tuple[str, str | None, str], _Plan]:
        return {}

    def _plan(self, op: str, resource: str | None, principal: str) -> _Plan:
        """The time caveats met before the first failing timeless caveat, and its reason."""
        # Refuse malformed requests outright so e.g. "ipc/bob/../alice" cannot ride on "ipc/bob".
        if not isinstance(op, str) or not OP_RE.fullmatch(op):
            return (), "malformed op"
        if resource is not None and (
            not isinstance(resource, str) or resource_problem(resource, pattern=False)
        ):
            return (), "malformed resource"
        req = Request(op, resource, principal, 0.0)
        timed: list[tuple[str, object]] = []
        for kind, value in self.caveats:
            if kind in ("exp", "nbf"):
                timed.append((kind, value))
                continue
            check = CAVEAT_CHECKS.get(kind)
            if check is None:
                return tuple(timed), f"unknown caveat {kind[:32]!r}"
            reason = check(value, req)
            if reason is not None:
                return tuple(timed), reason
        return tuple(timed), None
