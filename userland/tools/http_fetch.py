"""HTTP fetch: GET a URL. Disabled unless the caller's capability names the host (net/<host>)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from userland.tools.runtime import ToolError

MANIFEST = {
    "name": "http_fetch",
    "description": "Fetch a web page or API response over HTTP(S) and return its text.",
    "parameters": {"type": "object", "properties": {
        "url": {"type": "string", "pattern": "^https?://", "maxLength": 2048},
        "max_bytes": {"type": "integer", "minimum": 1, "maximum": 1048576, "default": 65536}},
        "required": ["url"], "additionalProperties": False},
    "side_effect": "network",
    "resources": {"url": "url"},
    "concurrency": 4,
    "timeout_s": 20.0,
}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could lead to a host the capability does not name: report it instead.
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise ToolError(f"redirected ({code}) to {newurl}; fetch that URL if it is allowed")


def run(args: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    opener = urllib.request.build_opener(_NoRedirect)
    limit = args.get("max_bytes", 65536)
    try:
        with opener.open(args["url"], timeout=max(1.0, ctx.get("deadline_s", 15) - 1)) as resp:
            body = resp.read(limit + 1)
            return {"status": resp.status, "content_type": resp.headers.get("Content-Type"),
                    "text": body[:limit].decode("utf-8", errors="replace"),
                    "truncated": len(body) > limit}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "text": exc.read(limit).decode("utf-8", errors="replace")}
    except (urllib.error.URLError, OSError) as exc:
        raise ToolError(f"fetch failed: {exc}") from None
