"""Content-addressed blobs: STATE/blobs/ab/<sha256>, written once, fsynced before any metadata
names them, verified on every read, deleted only once no committed version names them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kernel.state import fsync_dir

_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class BlobError(Exception):
    """A blob is missing or its bytes no longer match its name."""


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, exist_ok=True)
        self._dirs_synced: set[str] = set()

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store `data` durably (file and directory entry fsynced); returns its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        if final.exists():
            return digest
        folder = final.parent
        if not folder.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.root)
        tmp = folder / f".tmp-{os.getpid()}-{digest}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            # A full disk or an I/O error: the partial copy would hold the space it took.
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, final)
        fsync_dir(folder)
        return digest

    def get(self, digest: str) -> bytes:
        try:
            fd = os.open(self.path(digest), _OPEN_READ)
        except OSError as exc:
            raise BlobError(f"blob {digest[:12]} unreadable: {exc}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobError(f"blob {digest[:12]} is corrupt")
        return data

    def delete(self, digest: str) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def all(self) -> set[str]:
        return {p.name for p in self.root.glob("??/*") if not p.name.startswith(".tmp-")}

    def clean_temporaries(self) -> None:
        for tmp in self.root.glob("??/.tmp-*"):
            tmp.unlink(missing_ok=True)

