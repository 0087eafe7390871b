"""`agentos model`: pull, list, remove and verify the models in the model store."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial

import sdk
from sdk import abi, layout
from sdk.models import DTYPES, ENV_MODEL_DIR, ModelNotFound, ModelStore, StoreError, check_name
from userland.subcommand import JSON_HELP, subcommand

EXIT_ERROR = 1


def _store(args: argparse.Namespace) -> ModelStore:
    # The flag, then $AGENTOS_MODEL_DIR, then the XDG default (the last two are the store's own).
    return ModelStore(args.cache_dir)


def _error(exc: Exception) -> int:
    code = "ENOENT" if isinstance(exc, (ModelNotFound, FileNotFoundError)) else "EIO"
    print(f"agentos: {code}: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _size(n: int) -> str:
    for power, unit in ((3, "GB"), (2, "MB"), (1, "kB")):
        if n >= 1000**power:
            return f"{n / 1000**power:.1f} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    for scale, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}" if suffix == "B" else f"{n / scale:.0f}{suffix}"
    return str(n)


def _source(source: dict[str, object]) -> str:
    if source.get("kind") == "pypi-wheel":
        return f"pypi:{source['wheel']}=={source['version']}"
    return f"{source.get('kind')}:{source.get('path')}"


# --- subcommands ---------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    # Converting needs torch and transformers, so the kernel's store does it in a process of
    # its own; it prints the directory (and any warning) and exits as this command should.
    argv = [sys.executable, "-m", "kernel.llm.store", "pull", args.name, "--dtype", args.dtype]
    if args.source is not None:
        argv += ["--from", args.source]
    if args.cache_dir is not None:
        argv += ["--cache-dir", args.cache_dir]
    argv += ["--force"] * args.force + ["--quiet"] * args.quiet
    pull = subprocess.Popen(argv)
    try:
        return pull.wait()
    except KeyboardInterrupt:
        pull.wait()  # it had the same SIGINT: let it remove its staging directory first
        raise


def _served(args: argparse.Namespace) -> dict[str, list[abi.ModelInfo]]:
    """The running kernel's models by the store name each loads from ({} with no kernel): what
    a stored model runs in is the kernel's to say (`auto` resolves when a model loads)."""
    try:
        with sdk.connect(state_dir=layout.state_dir(getattr(args, "state_dir", None)),
                         timeout=5.0) as conn:
            infos = conn.llm.models()
    except sdk.SyscallError:
        return {}
    served: dict[str, list[abi.ModelInfo]] = {}
    for info in infos:
        if info.stored is not None:
            served.setdefault(info.stored, []).append(info)
    return served


def _runs(name: str, infos: list[abi.ModelInfo]) -> str:
    """What the kernel computes a stored model in: `bfloat16`, `unloaded` until its first
    request, `-` when no kernel serves it; another served name or device says so."""
    cells = []
    for info in infos:
        cell = info.running_dtype or "unloaded"
        if info.device not in (None, "cpu"):
            cell += f"@{info.device}"
        cells.append(cell if info.name == name else f"{info.name}={cell}")
    return ",".join(cells) or "-"


def cmd_list(args: argparse.Namespace) -> int:
    try:
        models = _store(args).list()
    except (StoreError, OSError) as exc:
        return _error(exc)
    served = _served(args)
    if args.json:
        print(json.dumps([{**m.to_dict(), "served": [
            {"name": i.name, "device": i.device, "running_dtype": i.running_dtype}
            for i in served.get(m.name, [])]} for m in models]))
        return 0
    print(f"{'NAME':<16} {'PARAMS':>7} {'STORED':<9} {'RUNS':<9} {'SIZE':>9}  {'CREATED':<20}  "
          "SOURCE")
    for m in models:
        print(f"{m.name:<16} {_params(m.params):>7} {m.dtype:<9} "
              f"{_runs(m.name, served.get(m.name, [])):<9} {_size(m.size):>9}  "
              f"{m.created:<20}  {_source(m.source)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    try:
        _store(args).remove(args.name)
    except (StoreError, OSError) as exc:
        return _error(exc)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        _store(args).verify(args.name)
    except (StoreError, OSError) as exc:
        return _error(exc)
    print(f"{args.name}: OK")
    return 0


# --- parser --------------------------------------------------------------------------------


def _name(text: str) -> str:
    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `model` and its subcommands to the `agentos` parser's subcommands."""
    cache_help = f"the model store (default ${ENV_MODEL_DIR}, else $XDG_CACHE_HOME/agentos/models)"
    text = "manage the model store: pull, list, rm, verify"
    p = sub.add_parser("model", help=text, description=text)
    p.add_argument("--cache-dir", metavar="DIR", help=cache_help)
    # Also accepted after the subcommand; SUPPRESS keeps an absent one from hiding the first.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS, help=cache_help)
    msub = p.add_subparsers(dest="model_command", required=True, metavar="COMMAND")

    command = partial(subcommand, msub, parents=[common])

    sp = command("pull", cmd_pull, "fetch a model, convert it to safetensors, store it; "
                 "print its directory")
    sp.add_argument("name", type=_name, help="the model's name in the store, e.g. smollm2")
    sp.add_argument("--from", dest="source", metavar="PATH",
                    help="a local HF-format model directory or .gguf file (default: the "
                         "known source for NAME)")
    sp.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="the dtype to store the weights in (default float32; auto keeps the "
                         "source's)")
    sp.add_argument("--force", action="store_true", help="replace a model already stored")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sp = command("list", cmd_list, "list the stored models: the dtype each is stored in and, "
                 "for those the running kernel serves, the one it computes in (RUNS)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)

    sp = command("rm", cmd_rm, "remove a model from the store")
    sp.add_argument("name", type=_name)

    sp = command("verify", cmd_verify, "recompute a model's checksums against its manifest")
    sp.add_argument("name", type=_name)


def main(argv: list[str] | None = None) -> int:
    """`python -m userland.model_cli model ...`: the model commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="agentos")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
