"""`agentos token|caps|approvals|approve|deny|audit`: the access manager from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import msgspec

import sdk
from sdk import layout
from userland.subcommand import JSON_HELP, subcommand

EXIT_ERROR = 1


def _connect(args: argparse.Namespace) -> sdk.Connection:
    return sdk.connect(state_dir=layout.state_dir(args.state_dir))


def _json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), default=repr))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _budgets(text: list[str]) -> dict[str, int]:
    out = {}
    for item in text:
        kind, eq, limit = item.partition("=")
        if not eq or not limit.isdigit():
            raise sdk.InvalidArgument(f"bad --budget {item!r}: want KIND=N")
        out[kind] = int(limit)
    return out


# --- subcommands ---------------------------------------------------------------------------


def cmd_token_mint(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        to = args.subject or conn.caps.inspect().subject
        grant = conn.caps.delegate(to, args.cap, group=args.group, ttl=args.ttl,
                                   budgets=_budgets(args.budget), once=args.once,
                                   requires_approval=args.requires_approval)
    if args.json:
        _json(grant)
    else:
        print(grant.token)
    return 0


# What `agentos token http NAME` grants: what the OpenAI and AIOS clients call (chat and the
# model list); `/metrics` wants sys.stats too, which only --metrics adds.
HTTP_KEY_CAPS = ("llm.chat", "llm.models")
HTTP_KEY_TTL = 30 * 86400.0


def cmd_token_http(args: argparse.Namespace) -> int:
    caps = [*HTTP_KEY_CAPS, *(["sys.stats"] if args.metrics else []), *args.cap]
    with _connect(args) as conn:
        grant = conn.caps.delegate(f"http:{args.name}", caps,
                                   ttl=None if args.ttl == 0 else args.ttl)
    if args.json:
        _json(grant)
    else:
        print(grant.token)
    return 0


def _token_id(conn: sdk.Connection, given: str) -> str:
    """A whole token id, from the id or the unique prefix (`caps list`'s PARENT column shows
    8 digits) of a token in the list."""
    if len(given) == 32:
        return given
    if not given or any(c not in "0123456789abcdef" for c in given.lower()):
        raise sdk.InvalidArgument(f"{given!r} is not a token id (hex digits, from `agentos caps "
                                  "list`)")
    found = {t.id for t in conn.caps.list(all=True, limit=10000)
             if t.id.startswith(given.lower())}
    if not found:
        raise sdk.NotFound(f"no token id starts with {given}")
    if len(found) > 1:
        raise sdk.InvalidArgument(f"{given} is the start of {len(found)} token ids; give more "
                                  "digits")
    return found.pop()


def cmd_caps_revoke(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        count = conn.caps.revoke(_token_id(conn, args.id))
    print(f"revoked {count} token(s)")
    return 0


def cmd_caps_list(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        tokens = conn.caps.list(subject=args.subject, all=args.all)
    if args.json:
        _json(tokens)
        return 0
    print(f"{'ID':<32}  {'SUBJECT':<14} {'PARENT':<8} {'ISSUED':<19}  {'EXPIRES':<19}  REVOKED")
    for t in tokens:
        parent = t.parent[:8] if t.parent else "-"
        print(f"{t.id:<32}  {t.subject:<14} {parent:<8} {_when(t.issued_at):<19}  "
              f"{_when(t.expires_at):<19}  {_when(t.revoked_at)}")
    return 0


def cmd_caps_inspect(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        info = conn.caps.inspect(args.token)
    if args.json:
        _json(info)
        return 0
    for key, value in msgspec.to_builtins(info).items():
        if key == "caveats":
            for caveat in value:
                print(f"caveat: {caveat}")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_caps_rotate(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        conn.caps.rotate()
    print("token key rotated: every earlier token is invalid; a new admin token was written")
    return 0


def cmd_caps_export(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        exported = conn.caps.export(ttl=args.ttl)
    if args.json:
        _json(exported)
    else:
        print(exported.token)
        print(f"public key: {exported.public_key}", file=sys.stderr)
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        pending = conn.approvals.list()
    if args.json:
        _json(pending)
        return 0
    print(f"{'ID':>6}  {'REQUESTER':<14} {'ACTION':<16} {'WAITING':>8} {'LEFT':>7}  DETAIL")
    now = time.time()
    for r in pending:
        print(f"{r.id:>6}  {r.principal:<14} {r.action:<16} {now - r.requested_at:>7.0f}s "
              f"{max(0, r.deadline - now):>6.0f}s  {json.dumps(r.detail, default=repr)}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        conn.approvals.approve(args.id)
    return 0


def cmd_deny(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        conn.approvals.deny(args.id, args.reason)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        if args.verify:
            report = conn.audit.verify(full=not args.quick)
            if args.json:
                _json(report)
            elif report.intact:
                print(f"audit log intact: {report.rows} rows, anchored at {report.anchored_seq}")
            else:
                print(f"audit log TAMPERED: chain broken at seq {report.broken_at}")
            return 0 if report.intact else EXIT_ERROR
        rows = conn.audit.read(since=args.since, limit=args.limit)
    if args.json:
        _json(rows)
        return 0
    for r in rows:
        detail = json.dumps(r.detail, sort_keys=True, default=repr)
        print(f"{r.seq:>6}  {_when(r.ts)}  {r.principal:<12} {r.event:<16} {detail}")
    return 0


# --- parser --------------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    token = sub.add_parser("token", help="mint capability tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    sp = subcommand(tsub, "mint", cmd_token_mint,
                    "mint a token (a child of yours) from a privilege group and/or rules; print it")
    sp.add_argument("--group", help="a privilege group ([groups.NAME] in the kernel config)")
    sp.add_argument("--cap", action="append", default=[], metavar="OP[@RESOURCE]")
    sp.add_argument("--ttl", type=float, metavar="SECONDS", help="expire after this long")
    sp.add_argument("--budget", action="append", default=[], metavar="KIND=N",
                    help="calls, llm_tokens, tools or bytes (repeatable)")
    sp.add_argument("--once", action="store_true", help="one-shot: valid for one call")
    sp.add_argument("--requires-approval", action="append", default=[], metavar="OP[@RESOURCE]",
                    help="hold matching calls until a human approves them")
    sp.add_argument("--for", dest="subject", metavar="PRINCIPAL",
                    help="its audience: agent:ID, an agent's name, user:UID, or http:NAME for "
                         "an HTTP API key (see `token http`) (default: you)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = subcommand(tsub, "http", cmd_token_http,
                    "mint an API key for the HTTP door (http:NAME): llm.chat and llm.models, "
                    "what the OpenAI and AIOS clients call; print it")
    sp.add_argument("name", help="who the key is for; its calls run as http:NAME")
    sp.add_argument("--ttl", type=float, default=HTTP_KEY_TTL, metavar="SECONDS",
                    help=f"expire after this long (default {HTTP_KEY_TTL:.0f}, 30 days; 0: never)")
    sp.add_argument("--metrics", action="store_true", help="also sys.stats, for /metrics")
    sp.add_argument("--cap", action="append", default=[], metavar="OP[@RESOURCE]",
                    help="a further right (repeatable)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)

    caps = sub.add_parser("caps", help="list, inspect, revoke and export capability tokens")
    csub = caps.add_subparsers(dest="caps_command", required=True, metavar="COMMAND")
    sp = subcommand(csub, "revoke", cmd_caps_revoke,
                    "revoke a token and every token derived from it")
    sp.add_argument("id", help="the token id, or its first digits (8 are usually enough)")
    sp = subcommand(csub, "list", cmd_caps_list, "list tokens (live ones unless --all)")
    sp.add_argument("--subject", metavar="PRINCIPAL")
    sp.add_argument("-a", "--all", action="store_true", help="include revoked and expired")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = subcommand(csub, "inspect", cmd_caps_inspect, "show a token's caveats, budgets and state")
    sp.add_argument("token", nargs="?", help="a token you hold (default: the admin token)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    subcommand(csub, "rotate-key", cmd_caps_rotate,
               "replace the token key: every token issued so far stops working")
    sp = subcommand(csub, "export", cmd_caps_export,
                    "print an Ed25519-signed export of your token for remote verifiers")
    sp.add_argument("--ttl", type=float, default=300.0, metavar="SECONDS")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)

    sp = subcommand(sub, "approvals", cmd_approvals, "list operations waiting for approval")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = subcommand(sub, "approve", cmd_approve, "approve a held operation: it runs now")
    sp.add_argument("id", type=int)
    sp = subcommand(sub, "deny", cmd_deny, "deny a held operation: it fails with EPERM")
    sp.add_argument("id", type=int)
    sp.add_argument("--reason", default="")
    sp = subcommand(sub, "audit", cmd_audit, "print the audit log, or --verify its hash chain")
    sp.add_argument("--verify", action="store_true",
                    help="check the chain and its anchor; exit 1 if tampered with")
    sp.add_argument("--quick", action="store_true",
                    help="with --verify: only the rows added since the last intact verify")
    sp.add_argument("--since", type=int, default=0, metavar="SEQ")
    sp.add_argument("--limit", type=int, default=1000)
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
