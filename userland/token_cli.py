"""`agentos token mint`: print a bearer token for the HTTP front end (the `http.mint` syscall)."""

from __future__ import annotations

import argparse
from typing import Any

import sdk
from sdk import abi, layout


def cmd_mint(args: argparse.Namespace) -> int:
    with sdk.connect(state_dir=layout.state_dir(args.state_dir)) as conn:
        token = conn.call("http.mint", abi.KeyArgs(caps=args.cap or ["llm.*", "sys.*"],
                                                   name=args.name, ttl_s=args.ttl), str)
    print(token)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("token", help="capability tokens", description="capability tokens")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    sp = tsub.add_parser("mint", help="print a bearer token for the HTTP front end",
                         description="Print a bearer token (API key) for the HTTP front end. "
                                     "It carries only the rules given, which must lie within "
                                     "the caller's own.")
    sp.set_defaults(fn=cmd_mint)
    sp.add_argument("--cap", action="append", metavar="OP[@RESOURCE]",
                    help="a right, e.g. llm.chat@llm/smollm2 or 'llm.*' (repeatable; default: "
                         "'llm.*' and 'sys.*')")
    sp.add_argument("--name", help="the client's name: it acts as principal http:NAME "
                                   "(AIOS's agent_name); default random")
    sp.add_argument("--ttl", type=float, metavar="SECONDS", help="expire after this long")
