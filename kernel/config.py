"""Kernel configuration: one dataclass with working defaults, overridden by TOML and flags."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk import layout


@dataclass
class Config:
    state_dir: Path = field(default_factory=layout.default_state_dir)
    log_format: str = "json"  # json | text
    log_level: str = "info"
    # SIGTERM: agents get SIGTERM, then SIGKILL after kill_grace; the kernel exits by drain_timeout.
    kill_grace: float = 5.0
    drain_timeout: float = 15.0
    max_message_bytes: int = 16 * 1024 * 1024
    # ipc: per-agent mailbox depth and per-message size.
    mailbox_depth: int = 1024
    ipc_message_bytes: int = 64 * 1024
    result_bytes: int = 1024 * 1024
    # Besides the kernel's own uid and root, these uids may connect as users.
    allowed_uids: tuple[int, ...] = ()
    # Denials are audited; beyond this many per second per principal they are only counted.
    audit_denials_per_s: float = 20.0

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> Config:
        """Defaults, then the TOML file's `[kernel]` table, then non-None overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                table = tomllib.load(f).get("kernel", {})
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(table) - known)
            if unknown:
                raise ValueError(f"{path}: unknown [kernel] keys: {', '.join(unknown)}")
            values.update(table)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "state_dir" in values:
            values["state_dir"] = Path(values["state_dir"]).expanduser().absolute()
        if "allowed_uids" in values:
            values["allowed_uids"] = tuple(values["allowed_uids"])
        return cls(**values)
