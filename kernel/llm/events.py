"""What a backend's step reports about each generation; the model's worker applies them.

A step returns a list of these small values instead of calling back into the worker, so the
worker alone turns them into replies, and a test reads a step's outcome as data. Each names
its generation by id; the worker ignores ids it no longer holds (cancelled meanwhile). They are
msgspec Structs: a step makes one Delta per generation per token, and a Struct is built in C,
at about half a dataclass's cost; none can hold a reference cycle, so the hot two skip the GC.
"""

from __future__ import annotations

import msgspec

from sdk import abi


class Started(msgspec.Struct, gc=False):
    """The generation entered a batch (or a remote server took it) for the first time."""

    id: int
    at: float  # monotonic time it was first scheduled
    cached: int = 0  # prompt tokens found in the prefix cache


class Delta(msgspec.Struct, gc=False):
    """The generation took part in a step: `text` to stream (empty for a prefill chunk or text
    held back for a stop string), `tokens` generated."""

    id: int
    text: str
    tokens: int = 0


class Finished(msgspec.Struct):
    """The generation ended. A remote server's reply gives its own `text`, tool calls and
    `usage`; otherwise the worker assembles them from the deltas."""

    id: int
    reason: str  # "stop" | "length" | the server's finish reason
    preemptions: int = 0
    text: str | None = None
    tool_calls: list[abi.ToolCall] | None = None
    usage: abi.Usage | None = None


class Failed(msgspec.Struct):
    """The generation cannot go on; its call fails with `code`."""

    id: int
    code: abi.ErrorCode
    message: str


Event = Started | Delta | Finished | Failed
