"""Build an agent's own virtual environment, as the user, outside any sandbox.

`agentos run` calls `build` for an agent that brings dependencies (`--requirements FILE`, or a
`requirements.txt` or `pyproject.toml` beside its code): the environment is made once per
requirements text and interpreter (their hash names it) under the cache dir, with uv where
it is installed (on PATH or beside this interpreter), else `python -m venv` and pip, showing
their progress on stderr; then the kernel runs the agent with its interpreter, bound read-only
into the sandbox (kernel/proc/venvs.py says what it checks). The build runs here and not in
the kernel because installing a package runs that package's code: as the user it can do what
the user can, in the kernel it would run as root.

The SDK and its dependencies (msgspec, pyzmq, posix-ipc) are not installed again: an
`agentos-sdk.pth` adds the site dir where this interpreter has them, after the environment's
own packages. So the environment's interpreter must be this one's Python version (`--python`
may name another installation of it); another version is refused before anything is built.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TextIO

ENV_DIR = "AGENTOS_VENV_DIR"  # where built environments are kept
FORMAT = "3"  # part of the hash: a change in how environments are built makes new ones
SDK_MODULES = ("msgspec", "zmq", "posix_ipc")
DONE = ".agentos-built"  # written last: an environment without it is half built


class BuildError(Exception):
    """The environment could not be built; nothing was started."""


def cache_dir() -> Path:
    """AGENTOS_VENV_DIR; else /var/cache/agentos/venvs for root (agents' uids must be able to
    read it: root's home is 0700), else the user's cache."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/cache/agentos/venvs")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "agentos" / "venvs"


def requirements_for(agent: Path, requirements: Path | None = None) -> tuple[str, Path] | None:
    """What the agent asks to have installed, and the directory relative paths in it are
    from: `requirements` if given, else `requirements.txt`, else the `[project]` dependencies
    of `pyproject.toml` beside its code; None if it brings nothing."""
    if requirements is not None:
        return _read(requirements), requirements.absolute().parent
    here = agent.absolute().parent
    if (here / "requirements.txt").is_file():
        return _read(here / "requirements.txt"), here
    if (here / "pyproject.toml").is_file():
        try:
            with open(here / "pyproject.toml", "rb") as f:
                project = tomllib.load(f).get("project", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BuildError(f"{here / 'pyproject.toml'}: {exc}") from None
        deps = project.get("dependencies", [])
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise BuildError(f"{here / 'pyproject.toml'}: [project] dependencies must be a "
                             "list of requirement strings")
        return ("\n".join(deps) + "\n" if deps else ""), here
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"cannot read requirements {path}: {exc}") from None


def _version(python: str) -> str:
    try:
        done = subprocess.run([python, "-I", "-c", "import sys; print(sys.version)"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"interpreter {python} does not run: {exc}") from None
    return done.stdout.strip()


def key(requirements: str, python: str, version: str, links: list[str]) -> str:
    """The environment's name: what it is built from, and the agentos installation its
    `agentos-sdk.pth` links to (`links`), so a moved or removed checkout gets a new one."""
    text = "\0".join((FORMAT, requirements, os.path.realpath(python), version,
                      *map(os.path.realpath, links)))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def build(requirements: str, cwd: Path, python: str | None = None,
          log: TextIO = sys.stderr) -> Path:
    """The environment for `requirements` (requirements.txt text) under `python` (default:
    this interpreter's base), built now or found built; its path."""
    python = python or getattr(sys, "_base_executable", sys.executable)
    version = _version(python)
    if version.split()[0].rsplit(".", 1)[0] != sys.version.split()[0].rsplit(".", 1)[0]:
        raise BuildError(f"{python} is Python {version.split()[0]}; the agent's interpreter "
                         f"must be the SDK's own version, {sys.version.split()[0]}")
    root = cache_dir()
    final = root / key(requirements, python, version, _sdk_dirs())
    if (final / DONE).is_file():
        print(f"agentos: venv {final} (built before)", file=log, flush=True)
        return final
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Built in place (console scripts' shebangs name the environment's own path), one build
    # at a time per hash: a second `agentos run` waits for the first and finds it built.
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / DONE).is_file():
            print(f"agentos: venv {final} (built meanwhile)", file=log, flush=True)
            return final
        shutil.rmtree(final, ignore_errors=True)  # a build that died halfway
        print(f"agentos: building venv {final} with {python}", file=log, flush=True)
        os.umask(0o022)  # nobody but the user may write it: the kernel refuses it otherwise
        try:
            _make(python, final, requirements, cwd, log)
            (final / DONE).write_text(f"{python}\n{version}\n")
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    print(f"agentos: venv {final} ready", file=log, flush=True)
    return final


def _uv() -> str | None:
    """uv on PATH, else beside this interpreter (a dev install of agentos has it in its .venv,
    which `.venv/bin/python -m ...` does not put on PATH)."""
    beside = Path(sys.executable).parent / "uv"
    return shutil.which("uv") or (str(beside) if os.access(beside, os.X_OK) else None)


def _make(python: str, work: Path, requirements: str, cwd: Path, log: TextIO) -> None:
    uv = _uv()
    if uv:
        _run([uv, "venv", "--quiet", "--python", python, str(work)], cwd, log)
    else:
        _run([python, "-m", "venv", "--without-pip", str(work)], cwd, log)
    target = str(work / "bin" / "python")
    if requirements.strip():
        listed = work / "agentos-requirements.txt"
        listed.write_text(requirements)
        if uv:
            # Compiled now, as pip does: the agent's read-only environment could not keep the
            # .pyc files, and each start would compile every module again (seconds).
            command = [uv, "pip", "install", "--compile-bytecode", "--python", target, "-r",
                       str(listed)]
        else:
            # pip runs from here against the environment (`--python`): none is put in it.
            command = [sys.executable, "-m", "pip", "--python", target, "install",
                       "--disable-pip-version-check", "--no-input", "-r", str(listed)]
        _run(command, cwd, log)
    site = subprocess.run([target, "-I", "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # As site dirs (their own .pth files run: an editable install's finder for `sdk`), after
    # the environment's own packages. A plain path entry would not do: Landlock lets the agent
    # read the `sdk` package but not list the checkout above it, where Python would look.
    lines = [f"import site; site.addsitedir({d!r})" for d in _sdk_dirs()]
    Path(site, "agentos-sdk.pth").write_text("\n".join(lines) + "\n")


def _sdk_dirs() -> list[str]:
    """Where this interpreter finds the SDK's dependencies."""
    import importlib.util

    dirs: dict[str, None] = {}
    for name in SDK_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise BuildError(f"this interpreter lacks {name}, which the SDK needs")
        origin = Path(spec.origin)
        top = origin.parent.parent if origin.name == "__init__.py" else origin.parent
        dirs.setdefault(str(top), None)
    return list(dirs)


def _run(command: list[str], cwd: Path, log: TextIO) -> None:
    """Run a build step with its output on `log` (the user sees pip's progress); a failure is
    a BuildError carrying its last lines."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    except OSError as exc:
        raise BuildError(f"{command[0]}: {exc}") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"  {line.rstrip()}", file=log, flush=True)
        tail = [*tail[-9:], line.rstrip()]
    if proc.wait() != 0:
        raise BuildError(f"{' '.join(command[:4])} ... failed ({proc.returncode}):\n"
                         + "\n".join(tail))
