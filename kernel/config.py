"""Kernel configuration: one dataclass with working defaults, overridden by TOML and flags."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk import layout


@dataclass
class ModelConfig:
    """One model the kernel serves: `[models.NAME]` in the config file."""

    name: str
    # A model-cache name (`agentos model pull NAME`), a local directory or .gguf file, or the
    # base URL of an OpenAI-compatible server (`http://host:port/v1`).
    source: str = ""
    device: str = "auto"  # cpu | cuda:N | auto
    dtype: str = "float32"  # float32 | bfloat16 | auto
    scheduler: str = "fair"  # fifo | rr | priority | fair | las
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    # 64: at 32, half of 64 concurrent agents wait a whole call for a row (vLLM's CPU build
    # runs 64 at once in the benchmark); a B=64 decode step costs less per token than B=32.
    max_batch: int = 64
    prefill_chunk: int = 256
    # KV memory the model's sequences may hold (running rows plus preemption snapshots), in
    # MiB; 0: no limit beyond max_batch. Over it, the batch shrinks and switched-out sequences
    # drop their KV (recomputed on resume) instead of keeping a snapshot.
    kv_budget_mb: float = 0.0
    threads: int | None = None  # torch intra-op threads; None: all cores
    default: bool = False
    # Per-agent limits (0: none): concurrent requests and tokens (prompt + generated).
    agent_max_concurrent: int = 0
    agent_max_tokens: int = 0
    # Remote (OpenAI-compatible) sources only.
    remote_model: str | None = None
    api_key_env: str | None = None
    max_concurrency: int = 16

    @property
    def remote(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    @classmethod
    def parse(cls, name: str, table: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"[models.{name}]: unknown keys: {', '.join(unknown)}")
        config = cls(name=name, **table)
        if not config.source:
            config.source = name
        return config


def parse_model_flag(text: str) -> ModelConfig:
    """`--model NAME` or `--model NAME=SOURCE` from the command line."""
    name, _, source = text.partition("=")
    if not name:
        raise ValueError(f"bad --model {text!r}: want NAME or NAME=SOURCE")
    return ModelConfig(name=name, source=source or name)


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
    # Load every model at boot instead of at its first request.
    preload: bool = False
    # Models by name; the first, or the one marked default, serves calls that name none.
    models: dict[str, ModelConfig] = field(
        default_factory=lambda: {"smollm2": ModelConfig("smollm2", "smollm2", default=True)})

    @property
    def default_model(self) -> str | None:
        marked = [m.name for m in self.models.values() if m.default]
        return marked[0] if marked else next(iter(self.models), None)

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> Config:
        """Defaults, then the TOML file's `[kernel]` and `[models.*]` tables, then non-None
        overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                document = tomllib.load(f)
            table = document.get("kernel", {})
            known = {f.name for f in dataclasses.fields(cls)} - {"models"}
            unknown = sorted(set(table) - known)
            if unknown:
                raise ValueError(f"{path}: unknown [kernel] keys: {', '.join(unknown)}")
            values.update(table)
            if "models" in document:
                values["models"] = {name: ModelConfig.parse(name, t)
                                    for name, t in document["models"].items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "state_dir" in values:
            values["state_dir"] = Path(values["state_dir"]).expanduser().absolute()
        if "allowed_uids" in values:
            values["allowed_uids"] = tuple(values["allowed_uids"])
        return cls(**values)
