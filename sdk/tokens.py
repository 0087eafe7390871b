"""The capability token format v1, shared by the kernel and the SDK: rules, caveats, encoding,
limits and the HMAC chain that lets any holder narrow a token offline.

A token is `aos1.` + unpadded base64url of the msgpack array `[key id, identifier, caveats,
signature]`: the identifier is `{tid, parent, sub, iat}`, each caveat the msgpack array `[kind,
value]`, and the signature `HMAC(... HMAC(HMAC(key, DOMAIN + identifier), caveat1) ...)`. Only
the kernel holds the key (kernel/access/tokens.py mints and verifies); which requests a token
allows and which tokens may be granted from it is the kernel's rule algebra
(kernel/access/rules.py). Everything here checks the same limits on both sides, so a token the
SDK builds is one the kernel can read, and one the kernel would refuse is refused here first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, TypeVar

import msgspec

from sdk import endpoints

__all__ = [
    "BUDGET_KINDS",
    "CAVEAT_FORMATS",
    "KEY_BYTES",
    "MAX_CAVEATS",
    "MAX_PRINCIPAL_CHARS",
    "MAX_RESOURCE_CHARS",
    "MAX_TOKEN_CHARS",
    "TOKEN_PREFIX",
    "CaveatFormat",
    "Rule",
    "Token",
    "TokenError",
    "attenuate",
    "decode_caveat",
    "encode_caveat",
    "op_matches",
    "parse_unverified",
    "resource_matches",
]

TOKEN_PREFIX = "aos1."
MAX_TOKEN_CHARS = 8192
MAX_CAVEATS = 64
MAX_RESOURCE_CHARS = 256
MAX_PRINCIPAL_CHARS = 256
KEY_BYTES = 32
BUDGET_KINDS = ("calls", "llm_tokens", "tools", "bytes")
MAX_BUDGET = 2**53

DOMAIN = b"agentos-token-v1\0"
KEY_ID_BYTES = 8
SIG_BYTES = 32

_OP_PATTERN_RE = re.compile(r"\*|[a-z][a-z0-9_]*\.(\*|[a-z][a-z0-9_]*)")
OP_RE = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
TID_RE = re.compile(r"[0-9a-f]{32}")
_BID_RE = re.compile(r"[0-9a-f]{16}")
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
    if prefix.startswith(endpoints.PREFIX) and len(prefix) > len(endpoints.PREFIX):
        # `net/HOST:PORT` is an endpoint, not a path: `*.example.org`, CIDR networks, ports
        n = len(endpoints.PREFIX)
        return resource.startswith(endpoints.PREFIX) and len(resource) > n and \
            endpoints.covers(prefix[n:], resource[n:])
    if prefix.endswith("/"):
        return resource.startswith(prefix)
    # "ipc/bob" must not match "ipc/bobby": the prefix has to end on a segment boundary.
    return resource.startswith(prefix) and (
        len(resource) == len(prefix) or resource[len(prefix)] == "/"
    )


def resource_problem(resource: str, *, pattern: bool) -> str | None:
    """Why ``resource`` is not a well-formed path (a rule prefix when ``pattern``), or None."""
    if not resource:
        return "resource is empty"
    if len(resource) > MAX_RESOURCE_CHARS:
        return f"resource longer than {MAX_RESOURCE_CHARS} characters"
    if not resource.isprintable() or any(c.isspace() for c in resource):
        return "resource contains whitespace or unprintable characters"
    if pattern and resource == "*":
        return None
    if resource.startswith(endpoints.PREFIX) and len(resource) > len(endpoints.PREFIX):
        return endpoints.problem(resource[len(endpoints.PREFIX):], pattern=pattern)
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
            problem = resource_problem(self.resource, pattern=True)
            if problem is not None:
                raise ValueError(f"invalid resource {self.resource!r}: {problem}")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse the CLI syntax ``OP[@RESOURCE]``, e.g. ``ipc.send@ipc/bob``; a `net.*` rule
        may name its endpoint without the `net/` of its resource (``net.connect@HOST:PORT``)."""
        if not isinstance(text, str):
            raise ValueError(f"rule must be a string, not {type(text).__name__}")
        op, at, resource = text.partition("@")
        if at and not resource:
            raise ValueError(f"invalid rule {text!r}: empty resource after '@'")
        if (op.startswith("net.") and at and resource != "*" and resource != "net"
                and not resource.startswith(endpoints.PREFIX)):
            resource = endpoints.PREFIX + resource.lower()
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


# --------------------------------------------------------------------------- caveats


@dataclass(frozen=True)
class CaveatFormat:
    """How one caveat kind's value is validated and written to the wire."""

    parse: Callable[[Any], Any]  # validate and normalise a value; raise ValueError if bad
    dump: Callable[[Any], Any] = lambda value: value  # normalised value -> msgpack-able value


def parse_principal(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"principal must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_PRINCIPAL_CHARS:
        raise ValueError(f"principal must be 1..{MAX_PRINCIPAL_CHARS} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"principal {value!r} contains whitespace or unprintable characters")
    return value


def parse_time(value: Any) -> float:
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


def _parse_rules(value: Any) -> tuple[Rule, ...]:
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


def _dump_rules(rules: tuple[Rule, ...]) -> list[list[str | None]]:
    return [[r.op, r.resource] for r in rules]


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
    if not isinstance(value, str) or not TID_RE.fullmatch(value):
        raise ValueError("one-shot nonce must be 32 hex digits")
    return value


# Read-only so nobody can loosen parsing at run time; new kinds are added here in source, and
# the kernel's checks (kernel/access/rules.py) name the same kinds.
CAVEAT_FORMATS: Mapping[str, CaveatFormat] = MappingProxyType(
    {
        "aud": CaveatFormat(parse_principal),
        "allow": CaveatFormat(_parse_rules, _dump_rules),
        "exp": CaveatFormat(parse_time),
        "nbf": CaveatFormat(parse_time),
        "budget": CaveatFormat(_parse_budget, list),
        "once": CaveatFormat(_parse_nonce),
        "requires_approval": CaveatFormat(_parse_rules, _dump_rules),
    }
)


def encode_caveat(kind: str, value: object) -> bytes:
    """Validate a caveat and return its msgpack encoding ``[kind, value]`` (ValueError if bad).

    ``allow`` takes ``Rule`` objects or ``[op, resource]`` pairs. Unknown kinds are encoded as
    given; every check of a token carrying one fails.
    """
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise ValueError(f"invalid caveat kind {kind!r}")
    spec = CAVEAT_FORMATS.get(kind)
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
    spec = CAVEAT_FORMATS.get(kind)
    if spec is None:
        return kind, value
    try:
        return kind, spec.parse(value)
    except ValueError as exc:
        raise TokenError(f"bad {kind!r} caveat: {exc}") from None


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    """A parsed token: who it was issued to and the caveats every use must satisfy."""

    token_id: str
    parent_id: str | None
    subject: str
    issued_at: float
    caveats: tuple[tuple[str, object], ...]

    @property
    def audiences(self) -> tuple[str, ...]:
        return tuple(v for k, v in self.caveats if k == "aud")  # type: ignore[misc]

    @property
    def expires_at(self) -> float | None:
        times = [v for k, v in self.caveats if k == "exp"]
        return min(times) if times else None  # type: ignore[type-var]

    @property
    def not_before(self) -> float | None:
        times = [v for k, v in self.caveats if k == "nbf"]
        return max(times) if times else None  # type: ignore[type-var]

    @property
    def rule_sets(self) -> tuple[tuple[Rule, ...], ...]:
        return tuple(v for k, v in self.caveats if k == "allow")  # type: ignore[misc]

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
        return tuple(r for k, v in self.caveats if k == "requires_approval" for r in v)  # type: ignore[attr-defined]


class Identifier(msgspec.Struct, forbid_unknown_fields=True):
    tid: str
    parent: str | None
    sub: str
    iat: float


_OUTER_DECODER = msgspec.msgpack.Decoder(tuple[bytes, bytes, list[bytes], bytes])
_IDENTIFIER_DECODER = msgspec.msgpack.Decoder(Identifier)

Parts = tuple[bytes, bytes, list[bytes], bytes]  # key_id, identifier, caveats, sig
T = TypeVar("T", bound=Token)


def chain(sig: bytes, caveats: Iterable[bytes]) -> bytes:
    """Extend a signature over `caveats`: each link is HMAC-SHA256(previous, caveat)."""
    for caveat in caveats:
        sig = hmac.digest(sig, caveat, "sha256")
    return sig


def sign(key: bytes, identifier: bytes, caveats: Iterable[bytes]) -> bytes:
    """The signature of a token minted with `key` (only the kernel holds one)."""
    return chain(hmac.digest(key, DOMAIN + identifier, "sha256"), caveats)


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def pack(key_id: bytes, identifier: bytes, caveats: list[bytes], sig: bytes) -> str:
    """The token text; TokenError if it would exceed MAX_TOKEN_CHARS."""
    token = TOKEN_PREFIX + _b64(msgspec.msgpack.encode((key_id, identifier, caveats, sig)))
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token too long")
    return token


def unpack(token: object) -> Parts:
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
        kid, identifier, caveats, sig = _OUTER_DECODER.decode(raw)
    except _DECODE_ERRORS:
        raise TokenError("malformed token: bad encoding") from None
    if len(kid) != KEY_ID_BYTES or len(sig) != SIG_BYTES:
        raise TokenError("malformed token: bad key id or signature length")
    if len(caveats) > MAX_CAVEATS:
        raise TokenError("too many caveats")
    if msgspec.msgpack.encode((kid, identifier, caveats, sig)) != raw:
        raise TokenError("malformed token: non-canonical encoding")
    return kid, identifier, caveats, sig


def parse_parts(identifier: bytes, caveats: list[bytes], cls: type[T]) -> T:
    """A token's identifier and caveats, decoded and validated (TokenError if bad)."""
    try:
        ident = _IDENTIFIER_DECODER.decode(identifier)
    except _DECODE_ERRORS:
        raise TokenError("malformed token identifier") from None
    if not TID_RE.fullmatch(ident.tid) or (
        ident.parent is not None and not TID_RE.fullmatch(ident.parent)
    ):
        raise TokenError("malformed token identifier")
    try:
        subject = parse_principal(ident.sub)
        issued_at = parse_time(ident.iat)
    except ValueError:
        raise TokenError("malformed token identifier") from None
    return cls(
        token_id=ident.tid,
        parent_id=ident.parent,
        subject=subject,
        issued_at=issued_at,
        caveats=tuple(decode_caveat(c) for c in caveats),
    )


def parse_unverified(token: str) -> Token:
    """Parse a token WITHOUT checking its signature: for display and inspection only."""
    _, identifier, caveats, _ = unpack(token)
    return parse_parts(identifier, caveats, Token)


def attenuate(token: str, *caveats: tuple[str, object]) -> str:
    """Offline narrowing: append caveats to a token; needs no key, since sig' = HMAC(sig, caveat).

    Raises TokenError for a malformed token or one that would exceed the limits, and ValueError
    for a malformed caveat.
    """
    kid, identifier, old, sig = unpack(token)
    parse_parts(identifier, old, Token)  # refuse to extend something verify would reject anyway
    new = []
    for caveat in caveats:
        if not isinstance(caveat, tuple) or len(caveat) != 2:
            raise ValueError(f"caveat must be a (kind, value) tuple, not {caveat!r}")
        new.append(encode_caveat(*caveat))
    if len(old) + len(new) > MAX_CAVEATS:
        raise TokenError("too many caveats")
    return pack(kid, identifier, old + new, chain(sig, new))
