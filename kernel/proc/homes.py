"""Agent homes on filesystems of their own: a byte quota the kernel enforces by construction.

An agent writes its home directly, past any syscall the kernel sees, so the kernel cannot count
those bytes; and the host's filesystem here has no project quotas. So a home with a quota is an
ext4 image of exactly that size (`agents/<id>/home.img`, sparse: only what is written takes
disk), loop-mounted on `agents/<id>/home` in the host's mount namespace, where both tiers see it
(the strict tier binds it into its own). Writing past it fails inside the agent with ENOSPC;
nothing else on the host fills up. ext4 keeps a few percent for itself (a 100 MiB home holds
about 90 MiB of files, and its inodes bound the number of files).

At every exit the home is locked down (root:root, 0700: whatever mode the agent left, no uid but
root reaches it) and unmounted; it is mounted again for a restart. When the agent is over, the
kernel keeps it or removes it (`home_at_exit`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

IMAGE = "home.img"
MIN_BYTES = 4 << 20  # ext4 with a journal needs a few MiB
HOME_AT_EXIT = ("keep", "remove")
_TOOLS = ("mkfs.ext4", "mount", "e2fsck", "resize2fs")
_SEARCH = "/usr/sbin:/sbin:/usr/bin:/bin"
_MNT_DETACH = 2
# nosuid/nodev as everywhere agents write; noinit_itable: the image is a sparse file, its inode
# tables already read as zeros, so ext4 need not spend I/O zeroing them in the background.
_MOUNT_OPTIONS = "loop,nosuid,nodev,noinit_itable"

_libc = ctypes.CDLL(None, use_errno=True)


class HomeError(OSError):
    """The home could not be given its quota (errno EDQUOT when it holds more than the quota,
    else why the mechanism failed)."""


def unavailable() -> str | None:
    """Why this machine cannot give homes a quota, or None if it can."""
    if os.geteuid() != 0:
        return "mounting a home's filesystem needs root"
    missing = [tool for tool in _TOOLS if shutil.which(tool, path=_SEARCH) is None]
    if missing:
        return f"{', '.join(missing)} not found (e2fsprogs, util-linux)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1:] == ["ext4"] for line in f):
            return "the kernel has no ext4"
    return None


def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> None:
    tool = shutil.which(argv[0], path=_SEARCH) or argv[0]
    done = subprocess.run([tool, *argv[1:]], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=60, env={"PATH": _SEARCH, "LC_ALL": "C"})
    if done.returncode not in ok:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise HomeError(errno.EIO, f"{argv[0]} failed ({done.returncode}): "
                                   f"{err[-1] if err else ''}")


def _make_image(image: Path, size: int, uid: int, gid: int) -> None:
    # O_EXCL|O_NOFOLLOW in the kernel-owned agent directory: nothing planted there is used.
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    try:
        # -m 0: the agent is not root, blocks reserved for root would only shrink its quota.
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E",
             f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
             str(image))
    except BaseException:
        image.unlink(missing_ok=True)
        raise


def _resize(image: Path, size: int) -> None:
    """Give an existing image a new quota (offline); EDQUOT if its files do not fit."""
    _run("e2fsck", "-f", "-p", str(image), ok=(0, 1))  # 1: it repaired what it found
    try:
        _run("resize2fs", str(image), f"{size // 1024}K")
    except HomeError as exc:
        raise HomeError(errno.EDQUOT, f"the home holds more than its new quota of {size} "
                                      f"bytes ({exc.strerror})") from None
    os.truncate(image, size)


def _own(path: Path, uid: int, gid: int) -> None:
    """The home's top directory: uid:gid, 0700, whatever the agent made of it (not followed
    if it is a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def mount(home: Path, size: int, uid: int, gid: int) -> None:
    """Mount the home's image (made on first use, resized if the quota changed) on `home`, an
    existing directory, and hand its top directory to uid:gid, 0700."""
    if size < MIN_BYTES:
        raise HomeError(errno.EINVAL, f"a home quota is at least {MIN_BYTES} bytes")
    image = home.parent / IMAGE
    unmount(home)  # left mounted by a kernel that died
    if not os.path.lexists(image):
        _make_image(image, size, uid, gid)
    elif not stat.S_ISREG(os.lstat(image).st_mode):
        raise HomeError(errno.EINVAL, f"{image} is not a regular file")
    elif os.lstat(image).st_size != size:
        _resize(image, size)
    _run("mount", "-t", "ext4", "-o", _MOUNT_OPTIONS, str(image), str(home))
    try:
        _own(home, uid, gid)
    except BaseException:
        unmount(home)
        raise


def reown(home: Path, old: int, new: int) -> int:
    """Hand the files `old` owns in the home to `new` (a restart that got another uid, its
    previous one being still busy on the host); how many. Symlinks are not followed, and the
    agent is not running to race the walk."""
    changed = 0
    for _, dirs, files, fd in os.fwalk(home, follow_symlinks=False):
        for name in (*dirs, *files):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if st.st_uid == old:
                os.chown(name, new, new if st.st_gid == old else st.st_gid, dir_fd=fd,
                         follow_symlinks=False)
                changed += 1
    return changed


def is_mounted(home: Path) -> bool:
    try:
        return os.path.ismount(home) and not os.path.islink(home)
    except OSError:
        return False


def unmount(home: Path) -> bool:
    """Detach whatever is mounted on `home` (lazily: a process still inside lets go when it
    ends; the loop device frees itself then); False if nothing was."""
    if not is_mounted(home):
        return False
    if _libc.umount2(os.fsencode(home), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise HomeError(err, f"unmounting {home}: {os.strerror(err)}")
    return True


def usage(home: Path) -> tuple[int, int]:
    """(bytes used, bytes the agent may use in all) of a mounted home."""
    st = os.statvfs(home)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, (
        st.f_blocks - st.f_bfree + st.f_bavail) * st.f_frsize


def lock_down(home: Path) -> None:
    """Root's alone (root:root, 0700): the agent is gone, and a home it opened to every uid
    must not stay open: its mounted filesystem, then the directory beneath."""
    if not os.path.isdir(home) or os.path.islink(home):
        return
    _own(home, 0, 0)
    if unmount(home):
        _own(home, 0, 0)


def remove(home: Path) -> None:
    """The home and its image, for good. rmtree does not follow symlinks the agent left."""
    unmount(home)
    (home.parent / IMAGE).unlink(missing_ok=True)
    if os.path.lexists(home):
        shutil.rmtree(home)


def detach_stale(agents: Path) -> list[str]:
    """Unmount every home a dead kernel left mounted under `agents/` (the state dir is this
    kernel's alone: it holds its lock); the mount points detached."""
    prefix = str(agents).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and backslash in octal.
            point = line.split()[4].encode().decode("unicode_escape").encode("latin-1")
            path = os.fsdecode(point)
            if path.startswith(prefix):
                found.append(path)
    for path in sorted(found, key=len, reverse=True):
        unmount(Path(path))
    return found
