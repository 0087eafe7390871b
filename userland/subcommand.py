"""The one way the `agentos` CLI modules declare a subcommand."""

from __future__ import annotations

import argparse
from typing import Any

# Every --json: one JSON value on one line of stdout (a listing is an array; times are Unix
# seconds in fields named *_at), described in docs/operations.md.
JSON_HELP = "print one JSON value on one line (docs/operations.md#json-output)"


def subcommand(parent: Any, name: str, fn: Any, help_text: str,
               **kwargs: Any) -> argparse.ArgumentParser:
    """Add `name` to `parent` (an `add_subparsers()` result), running `fn`; its help line is
    also its description."""
    sp = parent.add_parser(name, help=help_text, description=help_text, **kwargs)
    sp.set_defaults(fn=fn)
    return sp
