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

Both steps are on the spawn's path, on the kernel's loop. `Spares` keeps a few images of the
configured size formatted ahead, on a thread of its own (mkfs: ~13 ms of a spawn), and `mount`
attaches the loop device and mounts with the syscalls themselves (LOOP_CONFIGURE, mount(2):
~8 ms) rather than a `mount` process (~17 ms), falling back to it where they fail (measured
on the loaded 2-core VM; a spare image is ~0.7 MB on disk, sparse). The spares thread also
keeps a couple of them mounted ahead, as detached mounts (fsopen/fsmount, Linux 5.2) that no
path shows: taking one is a rename and a move_mount (~0.05 ms against ~1.1 ms for attaching
and mounting at the spawn). A detached mount lives only as long as the kernel's fd on it, so
a kernel that dies leaves none behind.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

from kernel.proc import mounts

log = logging.getLogger("kernel.proc.homes")

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
BACKGROUND_NICE = 19  # the spares thread's (a thread's own nice value: Linux's, per task)


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


# linux/loop.h
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4  # the device detaches itself when its last user (the mount) goes
_MS_NOSUID, _MS_NODEV = 2, 4


class _LoopInfo64(ctypes.Structure):
    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
                ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
                ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_uint8 * 64),
                ("lo_crypt_name", ctypes.c_uint8 * 64), ("lo_encrypt_key", ctypes.c_uint8 * 32),
                ("lo_init", ctypes.c_uint64 * 2)]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", _LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


def _ioctl(fd: int, request: int, arg: Any) -> int:
    result = _libc.ioctl(fd, ctypes.c_ulong(request), arg)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def _mount_loop(image: Path, home: Path) -> None:
    """Attach `image` to a free loop device (auto-clearing) and mount it on `home`, by the
    syscalls `mount(8)` makes, without its process."""
    def mount(device: str) -> None:
        if _libc.mount(device.encode(), os.fsencode(home), b"ext4",
                       ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), b"noinit_itable") != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount: {os.strerror(err)}")

    _on_loop(image, mount)


# The new mount API (Linux 5.2; numbered alike on every architecture from 424 on; move_mount
# is kernel/proc/mounts.py's).
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x2, 0x4
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1


def _syscall(what: str, number: int, *args: Any) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(result)


def _detached_mount(image: Path) -> int:
    """`image` mounted as `_mount_loop` would, but attached nowhere yet: an fd on the mount
    (`mounts.move_mount` puts it on a home). Closing the fd unmounts it and frees the loop
    device."""
    made: list[int] = []

    def mount(device: str) -> None:
        fs = _syscall("fsopen", _SYS_FSOPEN, b"ext4", _FSOPEN_CLOEXEC)
        try:
            _syscall("fsconfig", _SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, b"source",
                     device.encode(), 0)
            _syscall("fsconfig", _SYS_FSCONFIG, fs, _FSCONFIG_SET_FLAG, b"noinit_itable",
                     None, 0)
            _syscall("fsconfig", _SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0)
            made.append(_syscall("fsmount", _SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC,
                                 _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV))
        finally:
            os.close(fs)

    _on_loop(image, mount)
    return made[0]


def _on_loop(image: Path, mount: Any, tries: int = 8) -> None:
    """Attach `image` to a free loop device (auto-clearing) and call `mount(device path)`."""
    image_fd = os.open(image, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(tries):
                number = _ioctl(control, _LOOP_CTL_GET_FREE, 0)
                loop_fd = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    config = _LoopConfig(fd=image_fd)
                    config.info.lo_flags = _LO_FLAGS_AUTOCLEAR
                    try:
                        _ioctl(loop_fd, _LOOP_CONFIGURE, ctypes.byref(config))
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:  # another process took it meanwhile
                            continue
                        raise
                    # The mount holds the device from here; closing our fd leaves it attached.
                    mount(f"/dev/loop{number}")
                    return
                finally:
                    os.close(loop_fd)  # autoclear: a device left unmounted detaches here
            raise OSError(errno.EBUSY, "no free loop device")
        finally:
            os.close(control)
    finally:
        os.close(image_fd)


def mount(home: Path, size: int, uid: int, gid: int, spares: Spares | None = None) -> None:
    """Mount the home's image (made on first use — from `spares` when it holds one of this
    size —, resized if the quota changed) on `home`, an existing directory, and hand its top
    directory to uid:gid, 0700."""
    if size < MIN_BYTES:
        raise HomeError(errno.EINVAL, f"a home quota is at least {MIN_BYTES} bytes")
    image = home.parent / IMAGE
    unmount(home)  # left mounted by a kernel that died
    taken = (spares.take(size, image, home) if spares is not None
             and not os.path.lexists(image) else None)
    if taken is None and not os.path.lexists(image):
        _make_image(image, size, uid, gid)
    elif not stat.S_ISREG(os.lstat(image).st_mode):
        raise HomeError(errno.EINVAL, f"{image} is not a regular file")
    elif os.lstat(image).st_size != size:
        _resize(image, size)
    if taken != "mounted":
        try:
            _mount_loop(image, home)
        except OSError:  # an older kernel (no LOOP_CONFIGURE), no free /dev/loopN: util-linux
            _run("mount", "-t", "ext4", "-o", _MOUNT_OPTIONS, str(image), str(home))
    try:
        _own(home, uid, gid)
    except BaseException:
        unmount(home)
        raise


class Spares:
    """Home images of one size formatted ahead, in `directory` (root's, 0700, on the same
    filesystem as the homes, so taking one is a rename), kept at `count` by a thread that
    runs mkfs off the kernel's loop, and `mounted` more of them mounted ahead (detached: see
    the module's note), where this kernel has the new mount API. A dead kernel's spares are
    reused; its half-made ones (`*.tmp`), those it had mounted (`*.mnt`: no mount outlives
    its kernel, but one unmounted uncleanly is not worth checking) and any of another size
    are removed."""

    def __init__(self, directory: Path, size: int, count: int = 8, mounted: int = 2) -> None:
        self.directory, self.size, self.count = directory, size, count
        self.made = self.taken = 0
        self.mount_ahead = mounted
        self._mounted: list[tuple[Path, int]] = []  # (image, detached mount fd), oldest first
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        for entry in os.scandir(directory):
            if (not entry.name.endswith(".img") or not entry.is_file(follow_symlinks=False)
                    or entry.stat(follow_symlinks=False).st_size != size):
                os.unlink(entry.path)
        self._thread = threading.Thread(target=self._run, name="home-spares", daemon=True)
        self._thread.start()

    def ready(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.directory) if e.name.endswith(".img"))

    def take(self, size: int, image: Path, home: Path | None = None) -> str | None:
        """Move a spare of `size` bytes to `image`: "mounted" when it is mounted on `home`
        too (one mounted ahead), "image" when the caller is to mount it, None when no spare
        is ready."""
        if size != self.size:
            return None
        try:
            return self._take(image, home)
        finally:
            self._wake.set()  # after the take: the thread makes another

    def _take(self, image: Path, home: Path | None) -> str | None:
        with self._lock:
            ahead = self._mounted.pop(0) if home is not None and self._mounted else None
        if ahead is not None:
            path, fd = ahead
            try:
                os.rename(path, image)
            except OSError:
                os.close(fd)  # its image is gone from under it: unmounted, and not used
            else:
                self.taken += 1
                try:
                    mounts.move_mount(fd, str(home))
                    return "mounted"
                except OSError as exc:
                    log.warning("a home mounted ahead could not be attached; mounting it "
                                "again", extra={"home": str(home), "error": str(exc)})
                    return "image"
                finally:
                    os.close(fd)
        for name in self.ready():
            try:
                os.rename(self.directory / name, image)
            except FileNotFoundError:
                continue
            self.taken += 1
            return "image"
        return None

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        with self._lock:
            for _, fd in self._mounted:
                os.close(fd)  # unmounts it; its image stays for the next kernel
            self._mounted.clear()

    def _run(self) -> None:
        # Background work: the spawns it serves, and the agents they start, come first (mkfs
        # and the mounts it makes inherit this thread's nice value).
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        while not self._stop:
            try:
                while not self._stop and self._make_one():
                    pass
            except OSError as exc:  # disk full, mkfs gone: spawns make their own meanwhile
                log.warning("home spares not made", extra={"error": str(exc)})
                self._wake.wait(timeout=60)
            self._wake.wait()
            self._wake.clear()

    def _make_one(self) -> bool:
        """Format one image, or mount one ahead; False when there is nothing to do."""
        ready = self.ready()
        if len(ready) < self.count:
            tmp = self.directory / f"{secrets.token_hex(8)}.tmp"
            # root_owner 0:0: `mount` hands the top directory to the agent.
            _make_image(tmp, self.size, 0, 0)
            os.rename(tmp, tmp.with_suffix(".img"))
            self.made += 1
            return True
        if len(self._mounted) >= self.mount_ahead or not ready:
            return False
        image = self.directory / ready[0]
        path = image.with_suffix(".mnt")
        try:
            # Claimed first: an image is never mounted twice (here and by the spawn that
            # took it meanwhile, through another loop device).
            os.rename(image, path)
        except FileNotFoundError:
            return True  # a spawn took it
        try:
            fd = _detached_mount(path)
        except OSError as exc:  # no fsopen here (or not permitted): plain spares only
            log.info("homes are not mounted ahead here", extra={"error": str(exc)})
            self.mount_ahead = 0
            os.rename(path, image)
            return False
        with self._lock:
            if self._stop:
                os.close(fd)
                return False
            self._mounted.append((path, fd))
        return True


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
