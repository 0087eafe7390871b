"""Current time: UTC or any IANA zone, as ISO 8601 and a Unix timestamp."""

from __future__ import annotations

import datetime
import time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from userland.tools.runtime import ToolError

MANIFEST = {
    "name": "time",
    "description": "The current date and time, in UTC or an IANA time zone such as "
                   "'Europe/Paris'.",
    "parameters": {"type": "object", "properties": {
        "timezone": {"type": "string", "maxLength": 64, "default": "UTC"}},
        "additionalProperties": False},
    "side_effect": "read-only",
    "concurrency": 8,
    "timeout_s": 2.0,
}


def run(args: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    name = args.get("timezone", "UTC")
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {name!r}") from None
    now = time.time()
    return {"timezone": name, "iso": datetime.datetime.fromtimestamp(now, zone).isoformat(),
            "unix": now}
