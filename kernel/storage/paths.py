"""Paths inside an agent's file namespace: checked once, at the edge, so nothing escapes it.

A namespace is virtual (rows in SQLite, contents in blobs), so there is no symlink to follow
and no host path is ever built from a caller's string; these checks keep names unambiguous for
capabilities too. Escapes (`..`, absolute paths, and anything that normalises into one, such as
fullwidth dots or slashes) are EPERM; malformed names (NUL and other control characters,
invisible or bidirectional formatting characters, non-NFC text, empty or `.` segments) EINVAL.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

from sdk import abi

MAX_SEGMENT_BYTES = 255
MAX_RESOURCE_CHARS = 256  # sdk.tokens.MAX_RESOURCE_CHARS
# Unicode categories a file name may not contain: controls, formats (zero-width joiners,
# bidirectional overrides), surrogates, private use, unassigned, line/paragraph separators.
_BANNED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


class PathError(Exception):
    def __init__(self, code: abi.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def clean(path: str, *, root_ok: bool = False) -> str:
    """The canonical form of `path` (no leading or trailing '/'), or PathError. `root_ok`
    admits "" (the namespace root, for list)."""
    if path in ("", "/") and root_ok:
        return ""
    if not path:
        raise PathError(abi.ErrorCode.EINVAL, "empty path")
    folded = unicodedata.normalize("NFKC", path)
    if path.startswith("/") or folded.startswith(("/", "\\")):
        raise PathError(abi.ErrorCode.EPERM, f"absolute path {path!r}: paths are relative to "
                        "the namespace root")
    for candidate in (path, folded, folded.replace("\\", "/")):
        if ".." in candidate.split("/"):
            raise PathError(abi.ErrorCode.EPERM, f"{path!r} climbs out with '..'")
    bad = next((c for c in path if unicodedata.category(c) in _BANNED), None)
    if bad is not None:
        raise PathError(abi.ErrorCode.EINVAL, f"path contains U+{ord(bad):04X} "
                        f"({unicodedata.name(bad, 'unnamed')})")
    if "\\" in path:
        raise PathError(abi.ErrorCode.EINVAL, "path contains a backslash")
    if unicodedata.normalize("NFC", path) != path:
        raise PathError(abi.ErrorCode.EINVAL, "path is not in Unicode NFC form")
    if folded.count("/") != path.count("/"):
        raise PathError(abi.ErrorCode.EPERM, f"{path!r} contains look-alike separators")
    body = path[:-1] if path.endswith("/") else path
    for segment in body.split("/"):
        if segment in ("", "."):
            raise PathError(abi.ErrorCode.EINVAL, f"path {path!r} has an empty or '.' segment")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise PathError(abi.ErrorCode.EINVAL, "a path segment is over 255 bytes")
    return body


def resource(owner: str, path: str) -> str:
    """The capability resource naming `path` in `owner`'s namespace: `fs/agent/OWNER/PATH`,
    percent-encoded so that it is printable, space-free and unambiguous."""
    text = f"fs/agent/{owner}" + (f"/{quote(path, safe='/')}" if path else "")
    if len(text) > MAX_RESOURCE_CHARS:
        raise PathError(abi.ErrorCode.EINVAL, f"path too long for a capability ({len(text)} > "
                        f"{MAX_RESOURCE_CHARS} characters once encoded)")
    return text


def parents(path: str) -> list[str]:
    """The directories above `path`, outermost first ("a/b/c" -> ["a", "a/b"])."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
