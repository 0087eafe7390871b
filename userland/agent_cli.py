"""`agentos agent ...`: remote agents' CURVE keys (kernel/doors/remote.py) and client key pairs."""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any

import msgspec

import sdk
from sdk import abi, layout
from sdk.remote import ENV_CURVE, keygen
from userland.subcommand import JSON_HELP, subcommand


def _connect(args: argparse.Namespace) -> sdk.Connection:
    return sdk.connect(state_dir=layout.state_dir(args.state_dir))


def cmd_add_key(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        grant = conn.call("remote.add_key", abi.KeyArgs(name=args.name, key=args.key,
                                                        caps=args.cap), abi.RemoteGrant)
    if args.json:
        print(json.dumps(msgspec.to_builtins(grant)))
        return 0
    print(f"principal  {grant.principal}")
    print(f"endpoint   {grant.endpoint or '(not listening: boot with --listen tcp://HOST:PORT)'}")
    print(f"server key {grant.server_key}")
    print(f"token      {grant.token}")
    print(f"# on the client: {layout.ENV_ENDPOINT}=<endpoint> {layout.ENV_TOKEN}=<token> "
          f"{ENV_CURVE}='<server key> <its public key> <its secret key>'")
    return 0


def cmd_list_keys(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        keys = conn.call("remote.keys", None, list[abi.RemoteKey])
    if args.json:
        print(json.dumps(msgspec.to_builtins(keys)))
    for key in [] if args.json else keys:
        print(f"{key.name:<20} {key.key}")
    return 0


def cmd_rm_key(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        conn.call("remote.rm_key", abi.KeyRef(name=args.name), type(None))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    public, secret = keygen()
    print(f"public {public}\nsecret {secret}")
    return 0


def add_commands(sub: Any) -> None:
    """Add `agent` and its subcommands to the `agentos` parser's subcommands."""
    text = "remote agents: register CURVE client keys for the kernel's tcp:// endpoint"
    p = sub.add_parser("agent", help=text, description=text)
    asub = p.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")

    command = partial(subcommand, asub)

    sp = command("add-key", cmd_add_key, "register a client's public key as remote:NAME; print "
                 "the endpoint, the server's key and a token for it")
    sp.add_argument("name")
    sp.add_argument("key", help="the client's CURVE public key (z85, 40 characters; one that "
                    "begins with '-' goes after '--': add-key NAME -- KEY)")
    sp.add_argument("--cap", action="append", default=[], metavar="OP[@RESOURCE]",
                    help="grant a right besides sys.* (repeatable)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = command("list-keys", cmd_list_keys, "list the registered client keys")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = command("rm-key", cmd_rm_key, "unregister a client key: its connections are refused")
    sp.add_argument("name")
    command("keygen", cmd_keygen, "print a new CURVE key pair for a remote client")
