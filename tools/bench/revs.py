"""One benchmark, two commits, one run: is this tree slower than REV?

    .venv/bin/python tools/bench/revs.py REV [--rounds 2] -- syscall.py --seconds 3

Checks REV out into a temporary worktree, then runs the benchmark there and here in turns
(REV, here, REV, here, ...) with this interpreter, so drift on a shared machine falls on both
alike. Each run's last `RESULT key=value ...` line is kept; the table gives, per key, the
median of each side and here/REV (for a percentage, `_pct`, the difference in points). The
benchmark's own kernel and agents come from the tree it runs in (`python -m kernel` with that
tree as its working directory; agents find that tree's `sdk`).
Last line: `RESULT rev=REV key_ratio=... ...`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def result_of(output: str) -> dict[str, float]:
    """The numbers of the last RESULT line (words that are not key=number are left out)."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {}
    found = {}
    for word in lines[-1].split()[1:]:
        key, _, value = word.partition("=")
        try:
            found[key] = float(value.rstrip("x%"))
        except ValueError:
            continue
    return found


def run(tree: Path, bench: list[str], timeout: float) -> dict[str, float]:
    script = tree / "tools" / "bench" / bench[0]
    if not script.exists():
        raise SystemExit(f"revs: {script} does not exist at that commit")
    out = subprocess.run([sys.executable, str(script), *bench[1:]], cwd=tree, text=True,
                         capture_output=True, timeout=timeout)
    sys.stdout.write(out.stdout)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"revs: {bench[0]} failed in {tree} (exit {out.returncode})")
    return result_of(out.stdout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare against (any git revision)")
    parser.add_argument("--rounds", type=int, default=2, help="runs on each side, in turns")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = parser.parse_args(argv[:cut])
    bench = argv[cut + 1:]
    if not bench:
        parser.error("name a benchmark after --, e.g. -- syscall.py")
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, text=True,
                         capture_output=True)
    if rev.returncode != 0:
        parser.error(f"no commit {args.rev!r}: {rev.stderr.strip()}")
    short = rev.stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="revs-"))
    tree = tmp / short
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), short], cwd=ROOT,
                   check=True)
    sides: dict[str, list[dict[str, float]]] = {short: [], "here": []}
    try:
        for n in range(args.rounds):
            for side, path in ((short, tree), ("here", ROOT)):
                print(f"== round {n + 1}/{args.rounds}: {side}", flush=True)
                sides[side].append(run(path, bench, args.timeout))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [k for k in sides["here"][0] if all(k in r for rs in sides.values() for r in rs)]
    print(f"\n{' '.join(bench)}: median of {args.rounds} runs each, in turns")
    print(f"{'key':<28}{short:>14}{'here':>14}{'here vs ' + short:>16}")
    ratios = []
    for key in keys:
        before = statistics.median(r[key] for r in sides[short])
        after = statistics.median(r[key] for r in sides["here"])
        if key.endswith("_pct"):
            ratios.append(f"{key}_diff={after - before:+.1f}")
            change = f"{after - before:+.1f} pts"
        else:
            ratio = after / before if before else float("nan")
            ratios.append(f"{key}_ratio={ratio:.3f}")
            change = f"{ratio:.3f}x"
        print(f"{key:<28}{before:>14.2f}{after:>14.2f}{change:>16}")
    print(f"RESULT rev={short} " + " ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
