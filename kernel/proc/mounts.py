"""The strict tier's namespaces made in-process (the zygote's children): what bwrap does, by hand.

In two stages, so that the part every agent shares is done before an agent asks to start (a
spare, kernel/proc/zygote.py). The process is root and pid 1 of a fresh pid namespace.

`prepare` unshares the mount, network, IPC, UTS and cgroup namespaces, brings up loopback,
builds the agent's root on a tmpfs with the paths every agent of this interpreter reads (the
system libraries, the runtime, the `sdk`; bound from the host's tree, reached through a scratch
root), and pivots into it, dropping the host's tree: the waiting spare holds no host mount
but those.

`finish`, once the agent's policy is known, reads the agent's own paths (its home, its endpoint
directory, its code) in the *host's* mount namespace as it is now (a copy made earlier would not
show a home mounted since), as detached mount trees (`open_tree`), attaches them at their
places (`move_mount`) and makes the root read-only: no pivot and no unmount on the spawn's
path (each unmount waits for an RCU grace period, ~1 ms here). The layout is
`launch.bwrap_argv`'s table. A prepared path the policy does not list makes `finish` build a
whole root again from the host, so a spare never shows an agent more than its policy says.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kernel.proc import forward
from kernel.proc.sandbox import CLONE_NEWIPC, CLONE_NEWNET, Policy

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWCGROUP = 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
NODES = ("null", "zero", "full", "random", "urandom", "tty")
# open_tree(2) and move_mount(2) (Linux 5.2; numbered alike on every architecture from 424 on).
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
AT_FDCWD, AT_SYMLINK_NOFOLLOW, AT_RECURSIVE = -100, 0x100, 0x8000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 1, 4
# Where prepare builds the agent's root (under a scratch root: the host's /tmp before the
# pivot), and where finish builds it again when the prepared one will not do.
SCRATCH, ROOT, REBUILD = "/tmp", "/newroot", "/.rebuild"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)),
           f"mount {source} on {target}")


def pivot_root(new: str, old: str) -> None:
    _check(_libc.syscall(155 if os.uname().machine == "x86_64" else 41, new.encode(),
                         old.encode()), "pivot_root")


def open_tree(path: str) -> int:
    """A detached copy of the mount tree at `path` (what a recursive bind would attach), as an
    fd that can be attached in another mount namespace, which a bind cannot reach."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(),
                       OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE | AT_SYMLINK_NOFOLLOW)
    _check(fd, f"open_tree {path}")
    return fd


def move_mount(fd: int, target: str) -> None:
    _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(),
                         MOVE_MOUNT_F_EMPTY_PATH), f"move_mount to {target}")


def setns(fd: int, what: str) -> None:
    _check(_libc.setns(fd, CLONE_NEWNS), f"setns into {what}")


def can_open_trees() -> bool:
    """Whether this kernel has open_tree(2) (a spare needs it; without, the exec launcher)."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, b"/", os.O_CLOEXEC)
    if fd < 0:
        return False
    os.close(fd)
    return True


def table(policy: Policy, launcher_paths: list[str]) -> dict[str, str]:
    """Path -> dev | proc | tmpfs | ro | rw, as `launch.bwrap_argv` lays them out."""
    mounts: dict[str, str] = {"/dev": "dev", "/proc": "proc", "/tmp": "tmpfs"}
    for path in (*policy.readable, *launcher_paths):
        mounts.setdefault(path, "ro")
    if policy.socket_dir:
        mounts[policy.socket_dir] = "ro"
    for path in (policy.home, *policy.writable):
        if path:
            mounts[path] = "rw"
    if "/" in [p for p, kind in mounts.items() if kind in ("ro", "rw")]:
        raise ValueError("binding / would show the agent the whole host")
    return mounts


def shared(readable: tuple[str, ...], launcher_paths: list[str]) -> dict[str, str]:
    """What `prepare` builds ahead: the entries of `table` that do not depend on the agent
    (/tmp's size does: `finish` sets it)."""
    mounts = {"/dev": "dev", "/proc": "proc", "/tmp": "tmpfs"}
    for path in (*readable, *launcher_paths):
        mounts.setdefault(path, "ro")
    return mounts


def _ordered(mounts: dict[str, str]) -> list[tuple[str, str]]:
    return sorted(mounts.items(), key=lambda item: (item[0].count("/"), item[0]))


def _dirs_to(path: str) -> None:
    """Directories on the way to a mount point, 0755 (a 0700 /root would hide a runtime)."""
    for parent in [str(p) for p in reversed(Path(path).parents)][1:]:
        if not os.path.lexists(parent):
            os.mkdir(parent, 0o755)
            os.chmod(parent, 0o755)


def _target(target: str, is_dir: bool) -> None:
    _dirs_to(target)
    if not os.path.lexists(target):
        if is_dir:
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))


def _seal(target: str, readonly: bool) -> None:
    """A bind's own flags (it keeps its source's otherwise)."""
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    mount(None, target, None, flags)


# A source of host paths: `look(path)` says what the path is on the host (a directory, a file,
# a symlink's text, or None when it is missing) and `attach(path, target)` binds it at target.
Look = Callable[[str], "tuple[str, str] | None"]
Attach = Callable[[str, str], None]


def _build(root: str, entries: list[tuple[str, str]], look: Look, attach: Attach,
           tmp_bytes: int) -> None:
    """Make `entries` (path -> kind, parents first) in the tree at `root` ("" for /)."""
    for path, kind in entries:
        target = root + path
        if kind == "dev":
            _dirs_to(target)
            os.mkdir(target, 0o755)
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
            for node in NODES:
                if look(f"/dev/{node}") is not None:
                    os.close(os.open(f"{target}/{node}", os.O_CREAT | os.O_WRONLY, 0o666))
                    attach(f"/dev/{node}", f"{target}/{node}")
            for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                               ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(link, f"{target}/{name}")
            os.mkdir(f"{target}/shm", 0o1777)
            os.chmod(f"{target}/shm", 0o1777)
        elif kind == "proc":
            _dirs_to(target)
            os.mkdir(target, 0o555)
            mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif kind == "tmpfs":
            _dirs_to(target)
            os.mkdir(target, 0o1777)
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={tmp_bytes}")
        else:
            what = look(path)
            if what is None:
                raise FileNotFoundError(f"{path} is not there to bind")
            if what[0] == "link":
                if kind != "ro":
                    raise ValueError(f"{path} is reached through a symlink; name its real path")
                _dirs_to(target)
                os.symlink(what[1], target)
                continue
            _target(target, what[0] == "dir")
            attach(path, target)
            _seal(target, kind == "ro")


def _look_at(path: str) -> tuple[str, str] | None:
    """What `path` is, read where this process stands (the host's tree, or /oldroot's copy)."""
    if os.path.islink(path):
        return ("link", os.readlink(path))
    if not os.path.lexists(path):
        return None
    # A symlink further up would bind whatever it points to (and Landlock's rules, which
    # name the path, would miss it): the table names real paths only.
    if os.path.realpath(path) != path:
        raise ValueError(f"{path} is reached through a symlink; name its real path")
    return ("dir" if os.path.isdir(path) else "file", "")


@dataclass
class Prepared:
    """What `prepare` made: the entries built (path -> kind; "failed" for one half built)
    and an fd of the new mount namespace (for `finish` to come back to from the host's)."""

    mnt: int = -1
    built: dict[str, str] = field(default_factory=dict)


def prepare(shared_table: dict[str, str]) -> Prepared:
    """Stage one, before the agent is known: unshare, loopback up, and a root of its own with
    `shared_table`'s entries built, pivoted into, the host's tree dropped; it stays writable
    for `finish`. A shared path that is missing or not a real path is left to `finish`, which
    fails on it only if the agent's policy lists it."""
    if os.getpid() != 1:
        raise RuntimeError("not the first process of a fresh pid namespace")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
                         | CLONE_NEWCGROUP), "unshare")
    made = Prepared(os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
    _check(_libc.sethostname(b"agent", 5), "sethostname")
    forward.loopback_up()
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A scratch root to stand on while the agent's is built: the host's tree is reachable at
    # /oldroot until the agent's root is complete.
    mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.mkdir(SCRATCH + ROOT, 0o755)
    os.mkdir(SCRATCH + "/oldroot", 0o755)
    pivot_root(SCRATCH, SCRATCH + "/oldroot")
    os.chdir("/")
    mount("tmpfs", ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")

    def look(path: str) -> tuple[str, str] | None:
        return _look_at("/oldroot" + path)

    def attach(path: str, target: str) -> None:
        mount("/oldroot" + path, target, None, MS_BIND | MS_REC)

    built = made.built
    for path, kind in _ordered(shared_table):
        if kind in ("ro", "rw"):
            try:
                if look(path) is None:
                    continue  # finish's to refuse, if the policy lists it
            except ValueError:
                continue
        try:
            _build(ROOT, [(path, kind)], look, attach, 1 << 20)  # /tmp: finish sizes it
        except (OSError, ValueError):
            # Half built, perhaps: finish starts the root again rather than show it.
            built[path] = "failed"
            continue
        built[path] = kind
    _enter(ROOT)  # drops the scratch root, and the host's tree with it
    return made


def _enter(root: str) -> None:
    """Make the tree at `root` this mount namespace's root and drop the one it replaces."""
    os.chdir(root)
    pivot_root(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")


def finish(policy: Policy, launcher_paths: list[str], made: Prepared,
           host_mnt: int) -> dict[str, object]:
    """Stage two, the agent's: the rest of its table from the host's mount namespace (`host_mnt`,
    an fd of it), then the root made read-only. What the layer report says."""
    mounts = table(policy, launcher_paths)
    built = made.built
    rest_binds = [p for p, kind in mounts.items() if p not in built and kind in ("ro", "rw")]
    root = ""
    if any(mounts.get(path) != kind for path, kind in built.items()) or any(
            b.startswith(p.rstrip("/") + "/") for p in rest_binds for b in built):
        # A prepared path the policy does not list, one that failed, or one that a bind still
        # to come would cover (its parent): never more than the policy, so a root is built
        # again with nothing prepared in it.
        root, built = REBUILD, {}
        os.mkdir(root, 0o755)
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    rest = [(path, kind) for path, kind in _ordered(mounts) if path not in built]
    wanted = [p for p, kind in rest if kind in ("ro", "rw")]
    if any(kind == "dev" for _, kind in rest):
        wanted += [f"/dev/{node}" for node in NODES]
    # Read the host as it is now, in one visit to its mount namespace: what each path is, and
    # a detached copy of each to bind. Any failure here ends this process (report.step).
    seen: dict[str, tuple[str, str] | None] = {}
    trees: dict[str, int] = {}
    try:
        setns(host_mnt, "the host's mount namespace")
        try:
            for path in wanted:
                seen[path] = what = _look_at(path)
                if what is not None and what[0] != "link":
                    trees[path] = open_tree(path)
        finally:
            setns(made.mnt, "the agent's mount namespace")
    finally:
        os.close(made.mnt)
    os.chdir("/")

    def attach(path: str, target: str) -> None:
        move_mount(trees[path], target)
        # The copy of a shared host mount would be its peer: keep the agent's apart.
        mount(None, target, None, MS_REC | MS_PRIVATE)

    try:
        _build(root, rest, seen.get, attach, policy.limits.tmp_bytes)
    finally:
        for fd in trees.values():
            os.close(fd)
    if root:
        _enter(root)
    elif built.get("/tmp") == "tmpfs":  # prepared at the smallest size: the agent's now
        mount(None, "/tmp", None, MS_REMOUNT | MS_NOSUID | MS_NODEV,
              f"mode=1777,size={policy.limits.tmp_bytes}")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return {"via": "zygote", "unshared": ["mnt", "pid", "net", "ipc", "uts", "cgroup"],
            "prepared": len(built)}
