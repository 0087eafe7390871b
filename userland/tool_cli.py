"""`agentos tool`: list the kernel's tools, call one, mount and unmount MCP servers."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import msgspec

import sdk
from sdk import layout
from userland.subcommand import JSON_HELP, subcommand


def _connect(args: argparse.Namespace) -> sdk.Connection:
    return sdk.connect(state_dir=layout.state_dir(args.state_dir))


def cmd_list(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        specs = conn.tools.list()
        mounts = conn.tools.mounts()
    if args.json:
        print(json.dumps({"tools": msgspec.to_builtins(specs),
                          "mounts": msgspec.to_builtins(mounts)}))
        return 0
    print(f"{'NAME':<32} {'EFFECT':<12} {'LIMIT':>5} {'TIMEOUT':>8}  SOURCE")
    for s in specs:
        source = s.source if s.source.startswith("mcp:") or s.source == "builtin" else (
            "builtin" if "/userland/tools/" in s.source else s.source)
        print(f"{s.name:<32} {s.side_effect:<12} {s.concurrency:>5} {s.timeout_s:>7g}s  {source}")
    for m in mounts:
        if m.state != "ready":
            print(f"mount {m.name}: {m.state}{': ' + m.error if m.error else ''}",
                  file=sys.stderr)
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.arguments)
    except ValueError as exc:
        print(f"agentos: EINVAL: arguments are not JSON: {exc}", file=sys.stderr)
        return 2
    with _connect(args) as conn:
        result = conn.tools.call(args.name, arguments, timeout=args.timeout)
    if result.stdout:
        print(result.stdout, file=sys.stderr, end="" if result.stdout.endswith("\n") else "\n")
    if result.error is not None:
        print(f"agentos: EIO: tool {args.name} failed: {result.error}", file=sys.stderr)
        return 1
    print(json.dumps(result.value, indent=2, default=str))
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        print("agentos: EINVAL: want `agentos tool mount NAME -- COMMAND [ARG...]`",
              file=sys.stderr)
        return 2
    with _connect(args) as conn:
        names = conn.tools.mount(args.name, args.command, network=args.network,
                                 timeout=args.timeout)
    for name in names:
        print(name)
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        conn.tools.unmount(args.name)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `tool` and its subcommands to the `agentos` parser's subcommands."""
    text = "the kernel's tools: list, call, mount and unmount MCP servers"
    p = sub.add_parser("tool", help=text, description=text)
    tsub = p.add_subparsers(dest="tool_command", required=True, metavar="COMMAND")

    command = partial(subcommand, tsub)

    sp = command("list", cmd_list, "list the tools (built-in, from tool_dirs, and mounted)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)

    sp = command("call", cmd_call, "call a tool with JSON arguments; print its result")
    sp.add_argument("name")
    sp.add_argument("arguments", nargs="?", default="{}", help="a JSON object (default {})")
    sp.add_argument("--timeout", type=float, metavar="SECONDS")

    sp = command("mount", cmd_mount, "mount an MCP server (stdio) as NAME; print its tools")
    sp.add_argument("name")
    sp.add_argument("command", nargs=argparse.REMAINDER,
                    help="-- then the server's command line")
    sp.add_argument("--network", action="store_true",
                    help="let the server use the network (no Landlock or socket filter)")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")

    sp = command("unmount", cmd_unmount, "unmount an MCP server; its tools disappear")
    sp.add_argument("name")
