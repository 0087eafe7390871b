"""Tool manifests: what a tool is, what it may touch, and the argument check before it runs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

SIDE_EFFECTS = ("read-only", "writes", "destructive", "network")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# How an argument names something a capability must cover: `path` arguments become
# `file/<absolute path>`, `url`/`host` arguments `net/<host>`.
RESOURCE_KINDS = ("path", "url", "host")


class ManifestError(ValueError):
    """A manifest that cannot be served: its tool is refused at load or mount."""


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments (an object schema)
    side_effect: str = "read-only"
    result: dict[str, Any] | None = None  # JSON Schema of the result, when the tool has one
    concurrency: int = 4  # calls of this tool in flight at once, across all agents
    timeout_s: float = 10.0
    output_bytes: int = 256 * 1024  # a result larger than this fails the call (EQUOTA)
    # Arguments naming a resource: {argument: kind}. Their values are capability-checked, and
    # the calls lock them: readers share a resource, a writer has it alone.
    resources: dict[str, str] = field(default_factory=dict)
    # The tool searches the caller's own files: the kernel hands it their directories, and its
    # process may read agents' directories (it is trusted to stay in the ones it is handed).
    reads_caller_files: bool = False
    source: str = "builtin"  # builtin | a tool file's path | mcp:<mount>
    _validator: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "builtin") -> Manifest:
        """A manifest from its dict form (a tool module's MANIFEST), checked whole."""
        if not isinstance(data, dict):
            raise ManifestError("a manifest is a dict")
        known = {"name", "description", "parameters", "side_effect", "result", "concurrency",
                 "timeout_s", "output_bytes", "resources", "reads_caller_files"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"unknown manifest keys: {', '.join(unknown)}")
        name = data.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ManifestError(f"bad tool name {name!r}")
        side = data.get("side_effect", "read-only")
        if side not in SIDE_EFFECTS:
            raise ManifestError(f"{name}: side_effect must be one of {', '.join(SIDE_EFFECTS)}")
        params = data.get("parameters", {"type": "object"})
        for label, schema in (("parameters", params), ("result", data.get("result"))):
            if schema is None:
                continue
            try:
                validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ManifestError(f"{name}: {label} is not a valid JSON Schema: "
                                    f"{exc.message}") from None
        if params.get("type") != "object":
            raise ManifestError(f"{name}: parameters must be an object schema")
        concurrency, timeout = data.get("concurrency", 4), data.get("timeout_s", 10.0)
        output = data.get("output_bytes", 256 * 1024)
        if not isinstance(concurrency, int) or not 1 <= concurrency <= 256:
            raise ManifestError(f"{name}: concurrency must be 1..256")
        if not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
            raise ManifestError(f"{name}: timeout_s must be in (0, 3600]")
        if not isinstance(output, int) or not 1 <= output <= 16 << 20:
            raise ManifestError(f"{name}: output_bytes must be 1..16 MiB")
        resources = data.get("resources", {})
        if not isinstance(resources, dict) or any(
                k not in params.get("properties", {}) or v not in RESOURCE_KINDS
                for k, v in resources.items()):
            raise ManifestError(f"{name}: resources must map declared arguments to one of "
                                f"{', '.join(RESOURCE_KINDS)}")
        manifest = cls(name=name, description=str(data.get("description", "")),
                       parameters=params, side_effect=side, result=data.get("result"),
                       concurrency=concurrency, timeout_s=float(timeout), output_bytes=output,
                       resources=dict(resources),
                       reads_caller_files=bool(data.get("reads_caller_files", False)),
                       source=source)
        object.__setattr__(manifest, "_validator", validator_for(params)(params))
        return manifest

    def check_args(self, arguments: Any) -> str | None:
        """Why `arguments` do not fit the schema (the most relevant error), or None."""
        if not isinstance(arguments, dict):
            return f"{self.name}: arguments must be a JSON object, not {type(arguments).__name__}"
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{self.name}: {'argument ' + where + ': ' if where else ''}{error.message}"

    @property
    def exclusive(self) -> bool:
        """Whether a call holds its resources alone (writers) or shares them (readers)."""
        return self.side_effect in ("writes", "destructive")

    def openai(self) -> dict[str, Any]:
        """The OpenAI function schema `llm.chat(tools=...)` takes."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}
