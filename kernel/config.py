"""Kernel configuration: one dataclass with working defaults, overridden by TOML and flags."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk import layout
from sdk.models import DTYPES
from sdk.syscalls import known_op

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # sdk.abi.Name's pattern: a model's name


@dataclass
class ReplicaConfig:
    """One server of a fleet model: an entry of `replicas = [...]` in `[models.NAME]`."""

    url: str  # an OpenAI-compatible base URL, `http://host:port/v1`
    max_concurrency: int = 16  # calls streaming on it at once
    api_key_env: str | None = None  # the variable holding its API key

    @classmethod
    def parse(cls, model: str, i: int, table: Any, defaults: ModelConfig) -> ReplicaConfig:
        where = f"[models.{model}] replicas[{i}]"
        if not isinstance(table, dict):
            raise ValueError(f"{where}: want a table {{url = ..., max_concurrency = ...}}")
        unknown = sorted(set(table) - {"url", "max_concurrency", "api_key_env"})
        if unknown:
            raise ValueError(f"{where}: unknown keys: {', '.join(unknown)}")
        url = table.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{where}: url must be an http(s):// base URL (the local engine "
                             "cannot be a replica)")
        replica = cls(url=url.rstrip("/"),
                      max_concurrency=table.get("max_concurrency", defaults.max_concurrency),
                      api_key_env=table.get("api_key_env", defaults.api_key_env))
        if type(replica.max_concurrency) is not int or replica.max_concurrency < 1:
            raise ValueError(f"{where}: max_concurrency must be an integer >= 1")
        return replica


@dataclass
class ModelConfig:
    """One model the kernel serves: `[models.NAME]` in the config file."""

    name: str
    # A model-cache name (`agentos model pull NAME`), a local directory or .gguf file, or the
    # base URL of an OpenAI-compatible server (`http://host:port/v1`).
    source: str = ""
    device: str = "auto"  # cpu | cuda:N | auto
    # What the model computes in, whatever its weights are stored in: float32 | bfloat16 |
    # float16 | auto (bfloat16 where the device computes it natively: a CUDA GPU with bf16, a
    # CPU with AVX512-BF16 or AMX; float32 elsewhere), resolved once when the model loads.
    dtype: str = "auto"
    scheduler: str = "fair"  # fifo | rr | priority | fair | las
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    # 64: at 32, half of 64 concurrent agents wait a whole call for a row (vLLM's CPU build
    # runs 64 at once in the benchmark); a B=64 decode step costs less per token than B=32.
    max_batch: int = 64
    prefill_chunk: int = 256
    # Linear layers on weights laid out once for oneDNN, each only where its products are bit
    # for bit the plain ones (kernel/llm/engine/packed.py: bfloat16 on a CPU); false: never.
    pack_weights: bool = True
    # Speculative decoding by prompt lookup (greedy requests copy from their own context): on
    # in steps with at most this many decoding rows; 0: off. 4 gave 1.2-1.7x tok per CPU-second
    # at 1-4 agents (docs/benchmarks.md), but off by default: in bfloat16 greedy outputs then
    # differ from the unspeculated engine's (as they do between alone and batched).
    speculate_max_batch: int = 0
    # KV memory the model's sequences may hold (running rows plus preemption snapshots), in
    # MiB; 0: no limit beyond max_batch. Over it, the batch shrinks and switched-out sequences
    # drop their KV (recomputed on resume) instead of keeping a snapshot.
    kv_budget_mb: float = 0.0
    # Host memory, in MiB, for the KV of past prompts and replies that later calls reuse (the
    # prefix cache: shared system prompts, each agent's growing history). 2048 holds ~93k
    # tokens of SmolLM2 in bfloat16: the histories of ~600 ReAct agents at once; with fewer,
    # agents' second calls find their history evicted and prefill it again.
    prefix_cache_mb: float = 2048.0
    threads: int | None = None  # torch intra-op threads; None: all cores
    default: bool = False
    # Other names this model answers to (`aliases = ["gpt-4o-mini"]`): what third-party code
    # asks for. Like the `[aliases]` table; capabilities name the served model, never an alias.
    aliases: list[str] = field(default_factory=list)
    # Per-agent limits (0: none): llm.chat calls in flight on this model (EAGAIN beyond it,
    # refused before anything is queued), and tokens served over the agent's life (prompt +
    # generated, EQUOTA). A call holds at most the model's context, so 8 calls bound what one
    # agent has in flight to 8 contexts; lifetime token quotas are policy (also per token:
    # `llm_tokens` budgets), so none by default.
    agent_max_concurrent: int = 8
    agent_max_tokens: int = 0
    # The longest prompt accepted, in UTF-8 bytes of its text (EINVAL, measured before it is
    # queued or tokenized); 0: 16 bytes per token of the model's context (read from its
    # config.json; 32768 tokens when unknown: remote and .gguf models).
    max_prompt_bytes: int = 0
    # Remote (OpenAI-compatible) sources only.
    remote_model: str | None = None
    api_key_env: str | None = None
    max_concurrency: int = 16
    # Seconds the server may stay silent (connecting, or mid-stream) before the request fails
    # with ETIMEDOUT and the server is marked unhealthy until a probe finds it answering.
    remote_idle_s: float = 60.0
    # A fleet: several OpenAI-compatible servers serving this model (kernel/llm/fleet.py), each
    # `{url = "...", max_concurrency = N, api_key_env = "..."}` (the last two default to the
    # model's). A plain URL `source` is a fleet of one. Remote servers only: the local engine
    # is not a replica.
    replicas: list[ReplicaConfig] = field(default_factory=list)
    # Seconds between health checks (`GET {url}/models`) of a healthy replica; 0: checked only
    # after a call breaks on it.
    health_interval_s: float = 10.0
    # Whether an agent's calls go back to the replica that took its previous one (its prefix is
    # cached there); false: every call to the least loaded replica (to measure what affinity
    # buys: tools/bench/fleet.py).
    affinity: bool = True

    @property
    def remote(self) -> bool:
        return bool(self.replicas) or self.source.startswith(("http://", "https://"))

    def fleet(self) -> list[ReplicaConfig]:
        """The servers of a remote model: its replicas, or its one `source` URL."""
        if self.replicas:
            return self.replicas
        return [ReplicaConfig(self.source.rstrip("/"), self.max_concurrency, self.api_key_env)]

    @property
    def stored(self) -> str | None:
        """Its model-store name; None when it comes from a directory, a .gguf or a server."""
        if self.remote:
            return None
        source = Path(self.source).expanduser()
        return None if source.is_absolute() or source.exists() else self.source

    @classmethod
    def parse(cls, name: str, table: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"[models.{name}]: unknown keys: {', '.join(unknown)}")
        config = cls(name=name, **{k: v for k, v in table.items() if k != "replicas"})
        replicas = table.get("replicas", [])
        if not isinstance(replicas, list):
            raise ValueError(f"[models.{name}]: replicas must be a list of tables")
        config.replicas = [ReplicaConfig.parse(name, i, r, config)
                           for i, r in enumerate(replicas)]
        if config.replicas and config.source:
            raise ValueError(f"[models.{name}]: a fleet lists its servers in replicas, with no "
                             f"source ({config.source!r}); the local engine is not a replica")
        if config.replicas and not config.source:
            config.source = config.replicas[0].url  # what the model is shown as
        if not config.source:
            config.source = name
        if config.dtype not in DTYPES:
            raise ValueError(f"[models.{name}]: bad dtype {config.dtype!r}: one of "
                             f"{', '.join(DTYPES)}")
        if type(config.affinity) is not bool:
            raise ValueError(f"[models.{name}]: affinity must be true or false")
        if (type(config.prefix_cache_mb) not in (int, float)
                or not 0 <= config.prefix_cache_mb < float("inf")):
            raise ValueError(f"[models.{name}]: prefix_cache_mb must be a number >= 0 (0: no "
                             "prefix cache)")
        if type(config.speculate_max_batch) is not int or config.speculate_max_batch < 0:
            raise ValueError(f"[models.{name}]: speculate_max_batch must be an integer >= 0 "
                             "(0: off)")
        return config


def parse_model_flag(text: str) -> ModelConfig:
    """`--model NAME` or `--model NAME=SOURCE` from the command line."""
    name, _, source = text.partition("=")
    if not name:
        raise ValueError(f"bad --model {text!r}: want NAME or NAME=SOURCE")
    return ModelConfig(name=name, source=source or name)


@dataclass
class RouteRule:
    """One rule of a route: the call goes to `model` if it fits every limit the rule names."""

    model: str
    max_prompt_bytes: int | None = None  # the prompt's text, counted as for max_prompt_bytes
    max_tokens: int | None = None  # the call's max_tokens

    def fits(self, prompt_bytes: int, max_tokens: int) -> bool:
        return ((self.max_prompt_bytes is None or prompt_bytes <= self.max_prompt_bytes)
                and (self.max_tokens is None or max_tokens <= self.max_tokens))


@dataclass
class RouteConfig:
    """A model name that picks one of several served models per call: `[routes.NAME]`,
    `rules = [{model = "small", max_prompt_bytes = 4000}, {model = "large"}]`. The first rule
    the call fits takes it; the last names no limit, so every call lands somewhere."""

    name: str
    rules: list[RouteRule]

    @classmethod
    def parse(cls, name: str, table: Any) -> RouteConfig:
        where = f"[routes.{name}]"
        if not isinstance(table, dict) or set(table) != {"rules"}:
            raise ValueError(f"{where}: want rules = [{{model = ..., max_prompt_bytes = ...}}, "
                             "...]")
        rules = table["rules"]
        if not isinstance(rules, list) or not rules:
            raise ValueError(f"{where}: rules must be a non-empty list of tables")
        parsed = []
        for i, rule in enumerate(rules):
            known = {f.name for f in dataclasses.fields(RouteRule)}
            if not isinstance(rule, dict) or not isinstance(rule.get("model"), str):
                raise ValueError(f"{where} rules[{i}]: want a table with model = NAME")
            unknown = sorted(set(rule) - known)
            if unknown:
                raise ValueError(f"{where} rules[{i}]: unknown keys: {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
            for key in known - {"model"}:
                if key in rule and (type(rule[key]) is not int or rule[key] < 1):
                    raise ValueError(f"{where} rules[{i}]: {key} must be an integer >= 1")
            parsed.append(RouteRule(**rule))
        last = parsed[-1]
        if last.max_prompt_bytes is not None or last.max_tokens is not None:
            raise ValueError(f"{where}: the last rule must name no limit (where calls that fit "
                             "no other rule go)")
        return cls(name=name, rules=parsed)

    @functools.cached_property
    def prompt_limit(self) -> int:
        """Past this many prompt bytes no rule's limit can tell two prompts apart: counting
        may stop there."""
        return max((r.max_prompt_bytes or 0) for r in self.rules)

    def pick(self, prompt_bytes: int, max_tokens: int) -> str:
        return next(r.model for r in self.rules if r.fits(prompt_bytes, max_tokens))


@dataclass
class GroupConfig:
    """A privilege group (AIOS's term): `[groups.NAME]`, a named template of caveats that
    `agentos run --group NAME` and `agentos token mint --group NAME` grant."""

    name: str
    caps: list[str] = field(default_factory=list)  # OP[@RESOURCE] rules
    ttl: float | None = None  # seconds the token lives
    budgets: dict[str, int] = field(default_factory=dict)  # calls | llm_tokens | tools | bytes
    requires_approval: list[str] = field(default_factory=list)  # rules held for a human
    once: bool = False  # one-shot: the token works for exactly one call

    @classmethod
    def parse(cls, name: str, table: dict[str, Any]) -> GroupConfig:
        from sdk.tokens import BUDGET_KINDS, Rule

        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"[groups.{name}]: unknown keys: {', '.join(unknown)}")
        group = cls(name=name, **table)
        if not (isinstance(group.caps, list) and isinstance(group.requires_approval, list)
                and isinstance(group.budgets, dict)):
            raise ValueError(f"[groups.{name}]: caps and requires_approval are lists of rules, "
                             "budgets a table")
        for text in [*group.caps, *group.requires_approval]:
            if not known_op(Rule.parse(text).op):
                raise ValueError(f"[groups.{name}]: no syscall for rule {text!r}")
        for kind, limit in group.budgets.items():
            if kind not in BUDGET_KINDS or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"[groups.{name}]: bad budget {kind} = {limit!r}")
        if group.ttl is not None and not group.ttl > 0:
            raise ValueError(f"[groups.{name}]: ttl must be positive")
        return group


@dataclass
class Config:
    state_dir: Path = field(default_factory=layout.default_state_dir)
    log_format: str = "json"  # json | text
    log_level: str = "info"
    # SIGTERM: agents get SIGTERM, then SIGKILL after kill_grace; the kernel exits by drain_timeout.
    kill_grace: float = 5.0
    drain_timeout: float = 15.0
    # The largest request the kernel takes (EINVAL beyond), at most the ABI's ceiling
    # (sdk.abi.MAX_MESSAGE_BYTES: the SDK refuses larger ones itself, libzmq closes a peer
    # that sends one).
    max_message_bytes: int = 16 * 1024 * 1024
    # Calls one principal may have in flight (admitted and not yet answered: waiting for an
    # event, a model, a tool or the memory index), whichever door they came through; EAGAIN
    # beyond. Users (the CLI, `agentos top`, the admin's scripts) get the second; agents,
    # remote agents and HTTP keys the first.
    agent_calls_in_flight: int = 1024
    user_calls_in_flight: int = 8192
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
    # Shared-memory syscall rings per spawned agent (kernel/doors/rings.py): slots (a power of two),
    # bytes per slot (requests larger than a slot go over ZeroMQ), entries taken per agent per
    # loop round, and malformed entries tolerated before the ring is quarantined.
    rings: bool = True
    # A tcp:// endpoint for remote agents, with CurveZMQ (kernel/doors/remote.py); None: off.
    listen: str | None = None
    ring_capacity: int = 256
    ring_slot_size: int = 2048
    ring_batch: int = 64
    ring_max_faults: int = 8
    # After ring traffic the loop polls the busy rings a while without sleeping (io_uring's
    # SQPOLL idle time, adapted between 1/16 of this and this to the agents' pace): their
    # agents skip the doorbell and a call costs no wakeup. 0: off. Not while another thread
    # of the kernel works on a call (a model, a search: a spinning loop would hold its GIL).
    ring_poll_us: int = 2000
    # The longest an agent is advised to spin for its completions before sleeping on the
    # doorbell; advised only while the agents with ring traffic leave a CPU free each.
    ring_spin_us: int = 2000
    # Memory manager: embedder (auto: all-MiniLM-L6-v2 if pulled, else keyword search only),
    # per-namespace hard quota of stored bytes (EQUOTA), RAM tier quota per namespace and
    # kernel-wide, evicted with LRU-K once usage passes the threshold.
    memory_embedder: str = "auto"  # auto | minilm | hash | none
    memory_quota: int = 64 * 1024 * 1024
    memory_item_bytes: int = 256 * 1024
    memory_ram_quota: int = 16 * 1024 * 1024
    memory_ram_budget: int = 256 * 1024 * 1024
    memory_evict_threshold: float = 0.8
    memory_lru_k: int = 2
    # Storage manager: per-agent quota (bytes of every kept version), file size, retention.
    fs_quota: int = 256 * 1024 * 1024
    fs_file_bytes: int = 8 * 1024 * 1024
    fs_versions_kept: int = 20
    fs_versions_max_age_s: float = 0.0  # 0: versions beyond the newest expire only by count
    # The HTTP front end (OpenAI/AIOS-compatible APIs, metrics): "HOST:PORT", or None for off.
    http: str | None = None
    # Its limits (kernel/doors/http/limits.py): connections open in total and per peer (an IPv4
    # address or IPv6 /64; beyond: 503, closed), seconds to send a request's headers and then
    # its body (beyond: 408, closed), bytes of headers and of a body (431, 413).
    http_max_connections: int = 256
    http_max_per_peer: int = 128
    http_header_timeout: float = 5.0
    http_body_timeout: float = 30.0
    http_header_bytes: int = 64 * 1024
    http_body_bytes: int = 4 * 1024 * 1024
    # The door inside every sandbox (kernel/doors/http/agentdoor.py): the OpenAI and AIOS APIs on
    # 127.0.0.1:8080 of each strict or standard agent's own network namespace (served by the
    # kernel) with OPENAI_BASE_URL and OPENAI_API_KEY set; connections per agent (beyond:
    # 503, closed) and over all agents.
    agent_door: bool = True
    agent_door_connections: int = 16
    agent_door_total: int = 1024
    # The egress proxy (kernel/doors/egress.py): HTTP CONNECT and plain HTTP on each strict or
    # standard agent's 127.0.0.1:3128 of its namespace (served by the kernel) with HTTPS_PROXY,
    # HTTP_PROXY and ALL_PROXY set; each connection needs net.connect@HOST:PORT. Connections
    # open per agent (beyond: 429, closed) and over all agents; seconds to send the request
    # head, to resolve and to connect; ports plain HTTP is never forwarded to (CONNECT only).
    egress: bool = True
    egress_connections: int = 16
    egress_total: int = 1024
    egress_timeout: float = 10.0
    egress_connect_only: tuple[int, ...] = (443,)
    # Models by name; the first, or the one marked default, serves calls that name none.
    models: dict[str, ModelConfig] = field(
        default_factory=lambda: {"smollm2": ModelConfig("smollm2", "smollm2", default=True)})
    # Other names for served models (`[aliases]`: `gpt-4o-mini = "smollm2"`), merged with each
    # model's own `aliases` list (`model_aliases()`): every door and the SDK resolve a name
    # through them before anything else, so capabilities and accounting see the served name.
    aliases: dict[str, str] = field(default_factory=dict)
    # Names that pick a served model per call by the call's size (`[routes.NAME]`, above;
    # docs/fleets.md): resolved like an alias, before the capability check, so a call needs
    # `llm.chat` on the model its route picked.
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    # Agent sandbox (kernel/proc/spawner.py): the tier an agent gets unless `run --sandbox`
    # asks for another (none | standard | strict); a tier this machine cannot apply is refused.
    sandbox: str = "strict"
    # The Python that runs agents (None: the kernel's own). The standard tier reaches it
    # through the host's permissions, so a runtime under a 0700 directory (a pyenv in /root)
    # needs one elsewhere, with the SDK's dependencies (msgspec, pyzmq, posix_ipc).
    agent_python: str | None = None
    # Start standard and strict agents by forking a warm, pre-imported template per agent
    # interpreter (kernel/proc/zygote.py) instead of exec'ing the launcher and Python for each:
    # a fraction of the spawn time and memory. false: every agent through the exec launcher.
    zygote: bool = True
    # At most this many templates (one per distinct agent interpreter: each user-built venv
    # has its own, ~40 MB each); agents of further interpreters start through the exec launcher.
    zygotes_max: int = 4
    # Per-agent uids/gids (kernel as root): base + agent id, modulo the count.
    agent_uid_base: int = 200000
    agent_uid_count: int = 65536
    # Default rlimits for every agent (Limits field names: address_space, cpu_seconds,
    # open_files, processes, file_size, tmp_bytes, nice); `run --limit NAME=VALUE` overrides.
    agent_limits: dict[str, int] = field(default_factory=dict)
    # Captured stdout/stderr per agent and stream; beyond it output is dropped and counted.
    log_bytes: int = 64 * 1024 * 1024
    # Each sandboxed agent's home is a filesystem of this many bytes (kernel/proc/homes.py;
    # writes past it fail with ENOSPC in the agent); 0: a plain directory, no quota. When the
    # agent is over its home is kept, locked to root (keep), or deleted (remove).
    home_bytes: int = 1024 * 1024 * 1024
    home_at_exit: str = "keep"
    # Restart policies: backoff doubles from restart_backoff up to restart_backoff_max; after
    # restart_max restarts in a row, each within restart_window of the last start, it stops.
    restart_backoff: float = 0.5
    restart_backoff_max: float = 30.0
    restart_max: int = 5
    restart_window: float = 60.0

    # Privilege groups by name (`[groups.NAME]`).
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    # How long an operation held for a human's approval waits before failing with ETIMEDOUT.
    approval_timeout: float = 300.0
    # Agents' irreversible operations (deleting files or memories) wait for a human's approval.
    approve_irreversible: bool = True
    # Tools (kernel/tools): directories of extra tool modules besides userland/tools; the
    # sandbox tier of tool processes (auto: standard where tools can get a uid of their own and
    # reach the interpreter, else confined); destructive tools allowed to run (until approvals
    # route them, the rest are refused); MCP servers mounted at boot, {name = [command, ...]}.
    tool_dirs: list[str] = field(default_factory=list)
    tool_sandbox: str = "auto"
    tool_uid_base: int = 150000
    tools_allow_destructive: list[str] = field(default_factory=list)
    mcp_servers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def default_model(self) -> str | None:
        marked = [m.name for m in self.models.values() if m.default]
        return marked[0] if marked else next(iter(self.models), None)

    def model_aliases(self) -> dict[str, str]:
        """Every alias and the served model it names: `[aliases]` and the models' own lists,
        checked (ValueError) so no alias hides a served name or names two models."""
        from sdk.abi import MAX_NAME_CHARS

        merged: dict[str, str] = {}
        pairs = [(alias, target, "[aliases]") for alias, target in self.aliases.items()]
        for model in self.models.values():
            if not isinstance(model.aliases, list):
                raise ValueError(f"[models.{model.name}]: aliases is a list of names")
            pairs += [(alias, model.name, f"[models.{model.name}]") for alias in model.aliases]
        for alias, target, where in pairs:
            if not (isinstance(alias, str) and _NAME.fullmatch(alias)
                    and len(alias) <= MAX_NAME_CHARS):
                raise ValueError(f"{where}: bad alias {alias!r} (letters, digits, '_.-')")
            if not isinstance(target, str) or target not in self.models:
                raise ValueError(f"{where}: alias {alias!r} names {target!r}, which is not "
                                 f"served (served: {', '.join(self.models) or 'none'})")
            if alias in self.models:
                raise ValueError(f"{where}: alias {alias!r} is the name of a served model")
            if merged.setdefault(alias, target) != target:
                raise ValueError(f"{where}: alias {alias!r} names both {merged[alias]!r} and "
                                 f"{target!r}")
        return merged

    def check_routes(self) -> dict[str, str]:
        """Check the aliases (returned, as model_aliases) and the routes: a route's name is no
        served model's or alias's, and each rule names a served model or an alias of one
        (stored as the served name, so the pick needs no second lookup). ValueError."""
        from sdk.abi import MAX_NAME_CHARS

        aliases = self.model_aliases()
        for name, route in self.routes.items():
            if not (_NAME.fullmatch(name) and len(name) <= MAX_NAME_CHARS):
                raise ValueError(f"[routes.{name}]: bad name (letters, digits, '_.-')")
            if name in self.models or name in aliases:
                raise ValueError(f"[routes.{name}]: {name!r} is already a served model's or an "
                                 "alias's name")
            for i, rule in enumerate(route.rules):
                rule.model = aliases.get(rule.model, rule.model)
                if rule.model not in self.models:
                    raise ValueError(f"[routes.{name}] rules[{i}]: {rule.model!r} is not served "
                                     f"(served: {', '.join(self.models) or 'none'})")
        return aliases

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> Config:
        """Defaults, then the TOML file's `[kernel]` and `[models.*]` tables, then non-None
        overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                document = tomllib.load(f)
            table = document.get("kernel", {})
            known = {f.name for f in dataclasses.fields(cls)} - {
                "models", "groups", "aliases", "routes"}
            unknown = sorted(set(table) - known)
            if unknown:
                raise ValueError(f"{path}: unknown [kernel] keys: {', '.join(unknown)}")
            values.update(table)
            if "models" in document:
                values["models"] = {name: ModelConfig.parse(name, t)
                                    for name, t in document["models"].items()}
            if "aliases" in document:
                values["aliases"] = dict(document["aliases"])
            if "routes" in document:
                values["routes"] = {name: RouteConfig.parse(name, t)
                                    for name, t in document["routes"].items()}
            if "groups" in document:
                values["groups"] = {name: GroupConfig.parse(name, t)
                                    for name, t in document["groups"].items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "state_dir" in values:
            values["state_dir"] = Path(values["state_dir"]).expanduser().absolute()
        if "allowed_uids" in values:
            values["allowed_uids"] = tuple(values["allowed_uids"])
        if "egress_connect_only" in values:
            values["egress_connect_only"] = tuple(values["egress_connect_only"])
        config = cls(**values)
        config.check_sandbox()
        config.check_routes()
        return config

    def check_sandbox(self) -> None:
        """Refuse sandbox settings that would weaken isolation or cannot work."""
        from kernel.proc.sandbox import TIERS, Limits

        if self.sandbox not in TIERS:
            raise ValueError(f"sandbox must be one of {', '.join(TIERS)}, not {self.sandbox!r}")
        end = self.agent_uid_base + self.agent_uid_count
        if self.agent_uid_base <= 0 or self.agent_uid_count <= 0 or end > 2**32 - 1:
            raise ValueError(f"bad agent uid range {self.agent_uid_base}+{self.agent_uid_count}")
        # An agent uid that may also connect as a user would be both.
        if any(self.agent_uid_base <= uid < end for uid in self.allowed_uids):
            raise ValueError("allowed_uids overlaps the agent uid range")
        unknown = set(self.agent_limits) - set(Limits.__dataclass_fields__)
        if unknown:
            raise ValueError(f"agent_limits: unknown limits {', '.join(sorted(unknown))}")
        if not 0 <= self.agent_limits.get("nice", 0) <= 19:
            raise ValueError("agent_limits: nice must be 0..19")
        if self.ring_poll_us < 0 or self.ring_spin_us < 0:
            raise ValueError("ring_poll_us and ring_spin_us must be >= 0")
        if self.log_bytes < 0 or self.restart_max < 0 or self.restart_backoff <= 0:
            raise ValueError("log_bytes and restart_max must be >= 0, restart_backoff > 0")
        from kernel.proc.homes import HOME_AT_EXIT, MIN_BYTES

        if self.agent_python is not None and not os.path.isabs(self.agent_python):
            raise ValueError(f"agent_python must be an absolute path, not {self.agent_python!r}")
        if self.home_at_exit not in HOME_AT_EXIT:
            raise ValueError(f"home_at_exit must be one of {', '.join(HOME_AT_EXIT)}")
        if 0 < self.home_bytes < MIN_BYTES or self.home_bytes < 0:
            raise ValueError(f"home_bytes must be 0 (no quota) or at least {MIN_BYTES}")
        from sdk.abi import MAX_MESSAGE_BYTES

        if not 0 < self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be 1..{MAX_MESSAGE_BYTES} (the ABI's)")
        if self.agent_calls_in_flight < 1 or self.user_calls_in_flight < 1:
            raise ValueError("agent_calls_in_flight and user_calls_in_flight must be >= 1")
