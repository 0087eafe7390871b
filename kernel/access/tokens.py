"""Capability tokens v1: macaroon-style HMAC-SHA256 chains that any holder can narrow offline."""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from hmac import compare_digest
from types import MappingProxyType
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

__all__ = [
    "BUDGET_KINDS",
    "CAVEAT_KINDS",
    "MAX_CAVEATS",
    "MAX_TOKEN_CHARS",
    "TOKEN_PREFIX",
    "Capability",
    "CaveatKind",
    "Request",
    "Rule",
    "TokenAuthority",
    "TokenError",
    "attenuate",
    "decode_caveat",
    "encode_caveat",
    "op_matches",
    "parse_unverified",
    "resource_matches",
    "rule_covers",
    "rules_cover",
]

TOKEN_PREFIX = "aos1."
MAX_TOKEN_CHARS = 8192
MAX_CAVEATS = 64
MAX_RESOURCE_CHARS = 256
MAX_PRINCIPAL_CHARS = 256
VERIFY_CACHE_SIZE = 4096
_PLAN_CACHE_SIZE = 256  # memoised request verdicts per capability
KEY_BYTES = 32

_DOMAIN = b"agentos-token-v1\0"
_KEY_ID_BYTES = 8
_SIG_BYTES = 32

_OP_PATTERN_RE = re.compile(r"\*|[a-z][a-z0-9_]*\.(\*|[a-z][a-z0-9_]*)")
_OP_RE = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_TID_RE = re.compile(r"[0-9a-f]{32}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")

# msgspec signals bad input with DecodeError, but also UnicodeDecodeError for invalid UTF-8
# strings (both ValueErrors) and RecursionError for deeply nested arrays.
_DECODE_ERRORS = (ValueError, RecursionError)


class TokenError(Exception):
    """A token that cannot be used; ``reason`` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- rules


def op_matches(pattern: str, op: str) -> bool:
    """Whether the op pattern (``*``, ``family.*`` or ``family.op``) matches the syscall name."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return op.startswith(pattern[:-1])
    return op == pattern


def resource_matches(prefix: str, resource: str) -> bool:
    """Whether ``resource`` lies under ``prefix``, comparing whole path segments."""
    if prefix == "*":
        return True
    if prefix.endswith("/"):
        return resource.startswith(prefix)
    # "ipc/bob" must not match "ipc/bobby": the prefix has to end on a segment boundary.
    return resource.startswith(prefix) and (
        len(resource) == len(prefix) or resource[len(prefix)] == "/"
    )


def _resource_problem(resource: str, *, pattern: bool) -> str | None:
    """Why ``resource`` is not a well-formed path (a rule prefix when ``pattern``), or None."""
    if not resource:
        return "resource is empty"
    if len(resource) > MAX_RESOURCE_CHARS:
        return f"resource longer than {MAX_RESOURCE_CHARS} characters"
    if not resource.isprintable() or any(c.isspace() for c in resource):
        return "resource contains whitespace or unprintable characters"
    if pattern and resource == "*":
        return None
    if "*" in resource:
        # A literal "*" segment would read like a glob but match only itself; refuse the confusion.
        return "'*' is only allowed as the whole resource (use 'dir/' for everything under dir)"
    body = resource
    if resource.endswith("/"):
        if not pattern:
            return "resource ends with '/'"
        body = resource[:-1]
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            return "resource has an empty, '.' or '..' segment"
    return None


@dataclass(frozen=True)
class Rule:
    """One grant: an op pattern and an optional resource prefix (None: any resource, or none)."""

    op: str
    resource: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or not _OP_PATTERN_RE.fullmatch(self.op):
            raise ValueError(
                f"invalid op pattern {self.op!r}: expected '*', 'family.*' or 'family.op'"
            )
        if self.resource is not None:
            if not isinstance(self.resource, str):
                raise ValueError(f"resource must be a string, not {type(self.resource).__name__}")
            problem = _resource_problem(self.resource, pattern=True)
            if problem is not None:
                raise ValueError(f"invalid resource {self.resource!r}: {problem}")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse the CLI syntax ``OP[@RESOURCE]``, e.g. ``ipc.send@ipc/bob``."""
        if not isinstance(text, str):
            raise ValueError(f"rule must be a string, not {type(text).__name__}")
        op, at, resource = text.partition("@")
        if at and not resource:
            raise ValueError(f"invalid rule {text!r}: empty resource after '@'")
        return cls(op, resource if at else None)

    def matches(self, op: str, resource: str | None) -> bool:
        """Whether the request ``(op, resource)`` satisfies this rule."""
        if not op_matches(self.op, op):
            return False
        if self.resource is None:
            return True
        # A rule that names a resource never matches a request that names none (fail closed).
        return resource is not None and resource_matches(self.resource, resource)

    def __str__(self) -> str:
        return self.op if self.resource is None else f"{self.op}@{self.resource}"


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


# --------------------------------------------------------------------------- caveats


@dataclass(frozen=True, slots=True)
class Request:
    """What a caveat is checked against: one syscall by one connection at one moment."""

    op: str
    resource: str | None
    principal: str
    now: float


@dataclass(frozen=True)
class CaveatKind:
    """How one caveat kind is validated, checked and written to the wire."""

    parse: Callable[[Any], Any]  # validate and normalise a value; raise ValueError if bad
    check: Callable[[Any, Request], str | None]  # None if the caveat holds, else the reason
    dump: Callable[[Any], Any] = lambda value: value  # normalised value -> msgpack-able value


def _parse_principal(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"principal must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_PRINCIPAL_CHARS:
        raise ValueError(f"principal must be 1..{MAX_PRINCIPAL_CHARS} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"principal {value!r} contains whitespace or unprintable characters")
    return value


def _parse_time(value: Any) -> float:
    # bool is an int subclass, but True is not a timestamp.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"timestamp must be a number, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError("timestamp out of range") from None
    if not math.isfinite(seconds):
        raise ValueError("timestamp must be finite")
    return seconds


def _parse_allow(value: Any) -> tuple[Rule, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("allow must be a list of [op, resource] pairs")
    rules = []
    for item in value:
        if isinstance(item, Rule):
            rules.append(item)
        elif isinstance(item, list | tuple) and len(item) == 2:
            rules.append(Rule(item[0], item[1]))
        else:
            raise ValueError("allow must be a list of [op, resource] pairs")
    return tuple(rules)


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


BUDGET_KINDS = ("calls", "llm_tokens", "tools", "bytes")
MAX_BUDGET = 2**53
_BID_RE = re.compile(r"[0-9a-f]{16}")


def _parse_budget(value: Any) -> tuple[str, int, str]:
    """`[kind, limit, counter id]`: the counter id names the kernel-side counter, so a child
    that copies its parent's budget caveat draws on the same counter."""
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ValueError("budget must be [kind, limit, counter id]")
    kind, limit, bid = value
    if kind not in BUDGET_KINDS:
        raise ValueError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_BUDGET:
        raise ValueError(f"budget limit must be an integer in 0..{MAX_BUDGET}")
    if not isinstance(bid, str) or not _BID_RE.fullmatch(bid):
        raise ValueError("budget counter id must be 16 hex digits")
    return kind, limit, bid


def _parse_nonce(value: Any) -> str:
    if not isinstance(value, str) or not _TID_RE.fullmatch(value):
        raise ValueError("one-shot nonce must be 32 hex digits")
    return value


def _kernel_counted(value: Any, req: Request) -> str | None:
    # Budgets, one-shot nonces and approval requirements need kernel state; the access
    # manager (kernel/access/manager.py) enforces them on every use.
    return None


# Read-only so no caller can widen checking at run time; new kinds are added here in source.
CAVEAT_KINDS: Mapping[str, CaveatKind] = MappingProxyType(
    {
        "aud": CaveatKind(_parse_principal, _check_aud),
        "allow": CaveatKind(
            _parse_allow, _check_allow, lambda rules: [[r.op, r.resource] for r in rules]
        ),
        "exp": CaveatKind(_parse_time, _check_exp),
        "nbf": CaveatKind(_parse_time, _check_nbf),
        "budget": CaveatKind(_parse_budget, _kernel_counted, list),
        "once": CaveatKind(_parse_nonce, _kernel_counted),
        "requires_approval": CaveatKind(
            _parse_allow, _kernel_counted, lambda rules: [[r.op, r.resource] for r in rules]
        ),
    }
)


def encode_caveat(kind: str, value: object) -> bytes:
    """Validate a caveat and return its msgpack encoding ``[kind, value]`` (ValueError if bad).

    ``allow`` takes ``Rule`` objects or ``[op, resource]`` pairs. Unknown kinds are encoded as
    given; every check of a token carrying one fails.
    """
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise ValueError(f"invalid caveat kind {kind!r}")
    spec = CAVEAT_KINDS.get(kind)
    wire = value if spec is None else spec.dump(spec.parse(value))
    try:
        return msgspec.msgpack.encode((kind, wire))
    except (TypeError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        raise ValueError(f"caveat {kind!r} value cannot be encoded: {exc}") from None


def decode_caveat(data: bytes) -> tuple[str, object]:
    """Decode and strictly validate one encoded caveat (TokenError if bad).

    Known kinds come back normalised: aud -> str, allow -> tuple[Rule, ...], exp/nbf -> float.
    Unknown kinds come back as decoded, so they survive re-encoding.
    """
    try:
        obj = msgspec.msgpack.decode(data)
    except _DECODE_ERRORS:
        raise TokenError("malformed caveat") from None
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)):
        raise TokenError("malformed caveat")
    kind, value = obj
    spec = CAVEAT_KINDS.get(kind)
    if spec is None:
        return kind, value
    try:
        return kind, spec.parse(value)
    except ValueError as exc:
        raise TokenError(f"bad {kind!r} caveat: {exc}") from None


# --------------------------------------------------------------------------- capabilities


_Plan = tuple[tuple[tuple[str, object], ...], "str | None"]


@dataclass(frozen=True)
class Capability:
    """A parsed token: who it was issued to and the caveats every use must satisfy."""

    token_id: str
    parent_id: str | None
    subject: str
    issued_at: float
    caveats: tuple[tuple[str, object], ...]

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

    @cached_property
    def _plans(self) -> dict[tuple[str, str | None, str], _Plan]:
        return {}

    def _plan(self, op: str, resource: str | None, principal: str) -> _Plan:
        """The time caveats met before the first failing timeless caveat, and its reason."""
        # Refuse malformed requests outright so e.g. "ipc/bob/../alice" cannot ride on "ipc/bob".
        if not isinstance(op, str) or not _OP_RE.fullmatch(op):
            return (), "malformed op"
        if resource is not None and (
            not isinstance(resource, str) or _resource_problem(resource, pattern=False)
        ):
            return (), "malformed resource"
        req = Request(op, resource, principal, 0.0)
        timed: list[tuple[str, object]] = []
        for kind, value in self.caveats:
            if kind in ("exp", "nbf"):
                timed.append((kind, value))
                continue
            spec = CAVEAT_KINDS.get(kind)
            if spec is None:
                return tuple(timed), f"unknown caveat {kind[:32]!r}"
            reason = spec.check(value, req)
            if reason is not None:
                return tuple(timed), reason
        return tuple(timed), None

    @property
    def audiences(self) -> tuple[str, ...]:
        return tuple(v for k, v in self.caveats if k == "aud")

    @property
    def expires_at(self) -> float | None:
        times = [v for k, v in self.caveats if k == "exp"]
        return min(times) if times else None

    @property
    def not_before(self) -> float | None:
        times = [v for k, v in self.caveats if k == "nbf"]
        return max(times) if times else None

    @property
    def rule_sets(self) -> tuple[tuple[Rule, ...], ...]:
        return tuple(v for k, v in self.caveats if k == "allow")

    @cached_property
    def budgets(self) -> tuple[tuple[str, int, str], ...]:
        """(kind, limit, counter id) of every budget caveat."""
        return tuple(v for k, v in self.caveats if k == "budget")  # type: ignore[misc]

    @cached_property
    def nonces(self) -> tuple[str, ...]:
        return tuple(v for k, v in self.caveats if k == "once")  # type: ignore[misc]

    @cached_property
    def approval_rules(self) -> tuple[Rule, ...]:
        """Requests matching any of these rules wait for a human's approval."""
        return tuple(r for k, v in self.caveats if k == "requires_approval" for r in v)


class _Identifier(msgspec.Struct, forbid_unknown_fields=True):
    tid: str
    parent: str | None
    sub: str
    iat: float


_OUTER_DECODER = msgspec.msgpack.Decoder(tuple[bytes, bytes, list[bytes], bytes])
_IDENTIFIER_DECODER = msgspec.msgpack.Decoder(_Identifier)
_SHA256 = hashes.SHA256()


def _mac(key: bytes, data: bytes) -> bytes:
    mac = crypto_hmac.HMAC(key, _SHA256)
    mac.update(data)
    return mac.finalize()


def _chain(sig: bytes, caveats: Iterable[bytes]) -> bytes:
    for caveat in caveats:
        sig = _mac(sig, caveat)
    return sig


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_KEY_ID_BYTES]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


_Parts = tuple[bytes, bytes, list[bytes], bytes]  # key_id, identifier, caveats, sig


def _pack(key_id: bytes, identifier: bytes, caveats: list[bytes], sig: bytes) -> str:
    return TOKEN_PREFIX + _b64(msgspec.msgpack.encode((key_id, identifier, caveats, sig)))


def _unpack(token: object) -> _Parts:
    """Split a token into its parts, accepting only the one canonical spelling of each token."""
    if not isinstance(token, str):
        raise TokenError("token must be a string")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token too long")
    if not token.startswith(TOKEN_PREFIX):
        raise TokenError("not an aos1 token")
    body = token[len(TOKEN_PREFIX) :]
    if not _B64URL_RE.fullmatch(body) or len(body) % 4 == 1:
        raise TokenError("malformed token: bad base64")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    # Unused low bits of the last character would otherwise give one token several spellings.
    if _b64(raw) != body:
        raise TokenError("malformed token: non-canonical base64")
    try:
        key_id, identifier, caveats, sig = _OUTER_DECODER.decode(raw)
    except _DECODE_ERRORS:
        raise TokenError("malformed token: bad encoding") from None
    if len(key_id) != _KEY_ID_BYTES or len(sig) != _SIG_BYTES:
        raise TokenError("malformed token: bad key id or signature length")
    if len(caveats) > MAX_CAVEATS:
        raise TokenError("too many caveats")
    if msgspec.msgpack.encode((key_id, identifier, caveats, sig)) != raw:
        raise TokenError("malformed token: non-canonical encoding")
    return key_id, identifier, caveats, sig


def _capability(identifier: bytes, caveats: list[bytes]) -> Capability:
    try:
        ident = _IDENTIFIER_DECODER.decode(identifier)
    except _DECODE_ERRORS:
        raise TokenError("malformed token identifier") from None
    if not _TID_RE.fullmatch(ident.tid) or (
        ident.parent is not None and not _TID_RE.fullmatch(ident.parent)
    ):
        raise TokenError("malformed token identifier")
    try:
        subject = _parse_principal(ident.sub)
        issued_at = _parse_time(ident.iat)
    except ValueError:
        raise TokenError("malformed token identifier") from None
    return Capability(
        token_id=ident.tid,
        parent_id=ident.parent,
        subject=subject,
        issued_at=issued_at,
        caveats=tuple(decode_caveat(c) for c in caveats),
    )


def parse_unverified(token: str) -> Capability:
    """Parse a token WITHOUT checking its signature: for display and inspection only."""
    _, identifier, caveats, _ = _unpack(token)
    return _capability(identifier, caveats)


def attenuate(token: str, *caveats: tuple[str, object]) -> str:
    """Offline narrowing: append caveats to a token; needs no key, since sig' = HMAC(sig, caveat).

    Raises TokenError for a malformed token or one that would exceed the limits, and ValueError
    for a malformed caveat.
    """
    key_id, identifier, old, sig = _unpack(token)
    _capability(identifier, old)  # refuse to extend something verify would reject anyway
    new = []
    for caveat in caveats:
        if not isinstance(caveat, tuple) or len(caveat) != 2:
            raise ValueError(f"caveat must be a (kind, value) tuple, not {caveat!r}")
        new.append(encode_caveat(*caveat))
    if len(old) + len(new) > MAX_CAVEATS:
        raise TokenError("too many caveats")
    result = _pack(key_id, identifier, old + new, _chain(sig, new))
    if len(result) > MAX_TOKEN_CHARS:
        raise TokenError("token too long")
    return result


class TokenAuthority:
    """Holds the kernel's token key: mints tokens and verifies their HMAC chains."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"token key must be {KEY_BYTES} bytes")
        self._key = key
        self.key_id: bytes = _key_id(key)
        # The kernel verifies the same token on every syscall; key on the exact string so a
        # token that differs in any character always goes through full verification.
        self._cache: dict[str, Capability] = {}

    def mint(
        self,
        subject: str,
        rules: Iterable[Rule],
        *,
        audience: str | None = None,
        expires_at: float | None = None,
        not_before: float | None = None,
        parent_id: str | None = None,
        extra: Iterable[tuple[str, object]] = (),
    ) -> str:
        """Issue a token to ``subject``; audience defaults to subject.

        Caveat order: aud, allow, exp (if given), nbf (if given), then ``extra`` (kind, value)
        caveats. Raises ValueError on bad input or when the token would exceed MAX_TOKEN_CHARS.
        """
        subject = _parse_principal(subject)
        grants = tuple(rules)
        if any(not isinstance(rule, Rule) for rule in grants):
            raise ValueError("rules must be Rule objects")
        if parent_id is not None and (
            not isinstance(parent_id, str) or not _TID_RE.fullmatch(parent_id)
        ):
            raise ValueError(f"parent_id must be a token id (32 hex digits), not {parent_id!r}")
        caveats: list[tuple[str, object]] = [
            ("aud", subject if audience is None else audience),
            ("allow", grants),
        ]
        if expires_at is not None:
            caveats.append(("exp", expires_at))
        if not_before is not None:
            caveats.append(("nbf", not_before))
        caveats.extend(extra)
        encoded = [encode_caveat(kind, value) for kind, value in caveats]
        identifier = msgspec.msgpack.encode(
            _Identifier(tid=secrets.token_hex(16), parent=parent_id, sub=subject, iat=time.time())
        )
        sig = _chain(_mac(self._key, _DOMAIN + identifier), encoded)
        token = _pack(self.key_id, identifier, encoded, sig)
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"token would exceed {MAX_TOKEN_CHARS} characters; use fewer rules")
        return token

    def verify(self, token: str) -> Capability:
        """Check the token's key id and MAC chain and return it parsed; raises TokenError."""
        if isinstance(token, str):
            cached = self._cache.get(token)
            if cached is not None:
                return cached
        key_id, identifier, caveats, sig = _unpack(token)
        if key_id != self.key_id:
            raise TokenError("unknown key")
        expected = _chain(_mac(self._key, _DOMAIN + identifier), caveats)
        if not compare_digest(expected, sig):
            raise TokenError("bad signature")
        capability = _capability(identifier, caveats)
        if len(self._cache) >= VERIFY_CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = capability
        return capability
