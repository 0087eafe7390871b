"""Ed25519-signed token exports, for verifiers outside the kernel that cannot share its HMAC key.

A remote tool server holding only the kernel's public key checks an export with
`verify_export` and then each request with `check_export`; it needs `cryptography` and this
module, nothing else from the kernel. An export is a snapshot: its claims are the token's
caveats at export time, it expires after a short TTL (the remote side cannot see revocation),
and budgets and one-shot nonces travel as claims the remote side must count itself.

Format: `aosx1.` + base64url(canonical JSON claims) + `.` + base64url(Ed25519 signature over
the claims bytes).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kernel.access.rules import Capability
from sdk.tokens import Rule, TokenError

EXPORT_PREFIX = "aosx1."


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_key(path: Path) -> Ed25519PrivateKey:
    """The kernel's export key, created once (0600) beside its HMAC key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return Ed25519PrivateKey.from_private_bytes(path.read_bytes())
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    try:
        os.write(fd, key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def export_token(key_path: Path, cap: Capability, principal: str,
                 ttl: float) -> tuple[str, str]:
    """(export, public key hex) for a verified capability presented by `principal`."""
    now = time.time()
    expiry = now + ttl if cap.expires_at is None else min(cap.expires_at, now + ttl)
    claims: dict[str, Any] = {
        "v": 1, "tid": cap.token_id, "parent": cap.parent_id, "sub": cap.subject,
        "aud": sorted(set(cap.audiences)) or [principal], "iat": now, "exp": expiry,
        "nbf": cap.not_before,
        "allow": [[[r.op, r.resource] for r in rules] for rules in cap.rule_sets],
        "budgets": [list(b) for b in cap.budgets], "once": list(cap.nonces),
        "requires_approval": [[r.op, r.resource] for r in cap.approval_rules],
    }
    body = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    key = signing_key(key_path)
    signature = key.sign(body)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    return f"{EXPORT_PREFIX}{_b64(body)}.{_b64(signature)}", public


def verify_export(token: str, public_key_hex: str, now: float | None = None) -> dict[str, Any]:
    """The claims of a genuine, unexpired export; TokenError otherwise."""
    if not isinstance(token, str) or not token.startswith(EXPORT_PREFIX):
        raise TokenError("not an aosx1 export")
    try:
        body_text, sig_text = token[len(EXPORT_PREFIX):].split(".")
        body, signature = _unb64(body_text), _unb64(sig_text)
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    except ValueError:
        raise TokenError("malformed export") from None
    try:
        public.verify(signature, body)
    except InvalidSignature:
        raise TokenError("bad signature") from None
    claims = json.loads(body)
    now = time.time() if now is None else now
    if now >= claims["exp"]:
        raise TokenError("expired")
    if claims["nbf"] is not None and now < claims["nbf"]:
        raise TokenError("not yet valid")
    return claims


def check_export(claims: dict[str, Any], op: str, resource: str | None,
                 principal: str) -> str | None:
    """None if the verified claims allow `op` on `resource` for `principal`, else the reason."""
    if principal not in claims["aud"]:
        return "audience mismatch"
    for rule_set in claims["allow"]:
        if not any(Rule(o, r).matches(op, resource) for o, r in rule_set):
            return f"not allowed: {op}" + (f"@{resource}" if resource else "")
    return None
