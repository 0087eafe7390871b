"""Storage faults: the state directory's disk full (a small tmpfs), the database read-only.
The caller gets a typed error, the kernel keeps serving reads, nothing acknowledged is lost,
nothing is acknowledged that was not written, and writes work again once the fault clears,
without a restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdk
from tests.conftest import KernelProcess


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs (needs root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _boot(state: Path, env: dict[str, str] | None = None) -> KernelProcess:
    config = state.parent / "kernel.toml"
    config.write_text('[kernel]\nmemory_embedder = "hash"\nfs_versions_kept = 100000\n'
                      'fs_quota = 1099511627776\nmemory_quota = 1099511627776\n')
    k = KernelProcess(state, env)
    k.log_path = state.parent.parent / f"{state.parent.name}-kernel.log"  # off a full disk
    k.extra_args = ["--config", str(config)]
    return k.start()


def _fill(conn: sdk.Connection, acked: dict[str, bytes], prefix: str) -> sdk.SyscallError:
    """Write distinct files until the kernel refuses one; that refusal."""
    for i in range(100_000):
        data = os.urandom(48 * 1024) if i % 2 else f"{prefix}{i} ".encode() * 300
        path = f"{prefix}/f{i}"
        try:
            conn.fs.write(path, data, owner="full")
            conn.memory.add(f"{prefix} memory {i}", namespace="full/ns")
        except sdk.SyscallError as exc:
            return exc
        acked[path] = data
    raise AssertionError("the disk never filled")


def test_disk_full_is_enospc_reads_go_on_and_writes_resume(small_disk: Path) -> None:
    k = _boot(small_disk / "state")
    acked: dict[str, bytes] = {}
    memories: dict[int, str] = {}
    try:
        with k.connect(timeout=20) as conn:
            refusal = _fill(conn, acked, "a")
            assert refusal.code == sdk.ErrorCode.ENOSPC, refusal
            assert k.proc.poll() is None, "the kernel died of a full disk"
            conn.sys.null()
            some = list(acked)[-3:]
            for path in some:
                assert conn.fs.read(path, owner="full") == acked[path]
            with pytest.raises(sdk.SyscallError) as again:
                conn.fs.write("a/more", b"x" * 100_000, owner="full")
            assert again.value.code == sdk.ErrorCode.ENOSPC
            # A refused blob leaves no partial copy holding the space it took.
            assert not list((small_disk / "state" / "blobs").glob("??/.tmp-*"))
            # The database alone: its commit is what fails now.
            for i in range(100_000):
                content = f"m{i} " + "y" * 8000
                try:
                    memories[conn.memory.add(content, namespace="full/ns")] = content
                except sdk.SyscallError as exc:
                    assert exc.code == sdk.ErrorCode.ENOSPC, exc
                    break
            assert k.proc.poll() is None
            assert conn.memory.list(namespace="full/ns", limit=1)
            assert conn.audit.verify().intact
            subprocess.run(["mount", "-o", "remount,size=48m", str(small_disk)], check=True)
            conn.fs.write("b/after", b"space again", owner="full")  # no restart needed
            acked["b/after"] = b"space again"
        k.stop(signal.SIGKILL)
        k = _boot(small_disk / "state")
        with k.connect(timeout=20) as conn:
            for path, data in acked.items():
                assert conn.fs.read(path, owner="full") == data, f"acknowledged {path} lost"
            for memory_id, content in memories.items():
                assert conn.memory.get(memory_id, namespace="full/ns").content == content
            assert conn.audit.verify().intact
    finally:
        if k.proc is not None and k.proc.poll() is None:
            k.stop(signal.SIGKILL)


# Faults a filesystem cannot be asked for on demand, injected under the kernel with LD_PRELOAD:
# while `DIR/fsync` exists, fsync and fdatasync fail with EIO (a dying disk); while
# `DIR/pwrite` exists, pwrite fails with EROFS (SQLite writes its files only with pwrite, so
# this is the database gone read-only while the rest of the disk works).
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

static int faulty(const char *what) {
    const char *dir = getenv("AGENTOS_FAULTS");
    char path[4096];
    if (!dir) return 0;
    snprintf(path, sizeof path, "%s/%s", dir, what);
    return access(path, F_OK) == 0;
}
#define FAIL_IF(what, err) if (faulty(what)) { errno = err; return -1; }
int fsync(int fd) { FAIL_IF("fsync", EIO);
    return ((int (*)(int))dlsym(RTLD_NEXT, "fsync"))(fd); }
int fdatasync(int fd) { FAIL_IF("fsync", EIO);
    return ((int (*)(int))dlsym(RTLD_NEXT, "fdatasync"))(fd); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { FAIL_IF("pwrite", EROFS);
    return ((ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite"))(
        fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { FAIL_IF("pwrite", EROFS);
    return ((ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64"))(
        fd, b, n, o); }
"""


@pytest.fixture
def faults(tmp_path: Path) -> Path:
    """The directory whose files switch faults on; the shim is built into it."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the fault shim")
    folder = tmp_path / "faults"
    folder.mkdir()
    source = folder / "shim.c"
    source.write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(folder / "shim.so"),
                    str(source), "-ldl"], check=True)
    return folder


@pytest.mark.parametrize(("fault", "code"), [("fsync", "EIO"), ("pwrite", "EIO")])
def test_io_errors_are_eio_reads_go_on_and_writes_resume(tmp_path: Path, faults: Path,
                                                         fault: str, code: str) -> None:
    state = tmp_path / "state"
    k = _boot(state, {"LD_PRELOAD": str(faults / "shim.so"), "AGENTOS_FAULTS": str(faults)})
    acked: dict[str, bytes] = {}
    try:
        with k.connect(timeout=20) as conn:
            for i in range(5):
                conn.fs.write(f"before{i}", f"before {i}".encode(), owner="io")
                acked[f"before{i}"] = f"before {i}".encode()
            kept = conn.memory.add("kept", namespace="io/ns")
            (faults / fault).touch()
            try:
                for write in (lambda: conn.fs.write("during", b"during", owner="io"),
                              lambda: conn.memory.add("during", namespace="io/ns"),
                              lambda: conn.caps.delegate("user:0", ["memory.list@mem/io/ns"])):
                    with pytest.raises(sdk.SyscallError) as refused:
                        write()
                    assert refused.value.code == sdk.ErrorCode[code], refused.value
                assert k.proc.poll() is None, f"the kernel died of failing {fault}"
                conn.sys.null()
                assert conn.fs.read("before3", owner="io") == b"before 3"
                assert conn.memory.get(kept, namespace="io/ns").content == "kept"
            finally:
                (faults / fault).unlink()
            conn.fs.write("after", b"after", owner="io")  # no restart needed
            acked["after"] = b"after"
            assert conn.audit.verify().intact
        k.stop(signal.SIGKILL)
        k = _boot(state)
        with k.connect(timeout=20) as conn:
            for path, data in acked.items():
                assert conn.fs.read(path, owner="io") == data, f"acknowledged {path} lost"
            assert conn.audit.verify().intact
    finally:
        if k.proc is not None and k.proc.poll() is None:
            k.stop(signal.SIGKILL)
