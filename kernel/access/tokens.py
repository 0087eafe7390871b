"""The kernel's token authority: it alone holds the key, so it alone mints tokens and verifies
their HMAC chains. The format is `sdk/tokens.py`; what a verified token allows is
`kernel/access/rules.py`."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from hmac import compare_digest

import msgspec

from kernel.access.rules import Capability
from sdk.tokens import (
    KEY_BYTES,
    MAX_TOKEN_CHARS,
    TID_RE,
    Identifier,
    Rule,
    TokenError,
    encode_caveat,
    key_id,
    pack,
    parse_parts,
    parse_principal,
    sign,
    unpack,
)

__all__ = ["TokenAuthority"]

VERIFY_CACHE_SIZE = 4096


class TokenAuthority:
    """Holds the kernel's token key: mints tokens and verifies their HMAC chains."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"token key must be {KEY_BYTES} bytes")
        self._key = key
        self.key_id: bytes = key_id(key)
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
        subject = parse_principal(subject)
        grants = tuple(rules)
        if any(not isinstance(rule, Rule) for rule in grants):
            raise ValueError("rules must be Rule objects")
        if parent_id is not None and (
            not isinstance(parent_id, str) or not TID_RE.fullmatch(parent_id)
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
            Identifier(tid=secrets.token_hex(16), parent=parent_id, sub=subject, iat=time.time())
        )
        try:
            return pack(self.key_id, identifier, encoded, sign(self._key, identifier, encoded))
        except TokenError:
            raise ValueError(f"token would exceed {MAX_TOKEN_CHARS} characters; use fewer "
                             "rules") from None

    def verify(self, token: str) -> Capability:
        """Check the token's key id and MAC chain and return it parsed; raises TokenError."""
        if isinstance(token, str):
            cached = self._cache.get(token)
            if cached is not None:
                return cached
        kid, identifier, caveats, sig = unpack(token)
        if kid != self.key_id:
            raise TokenError("unknown key")
        if not compare_digest(sign(self._key, identifier, caveats), sig):
            raise TokenError("bad signature")
        capability = parse_parts(identifier, caveats, Capability)
        if len(self._cache) >= VERIFY_CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = capability
        return capability
