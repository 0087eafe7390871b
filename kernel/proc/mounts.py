"""The strict tier's namespaces made in-process (the zygote's children): what bwrap does, by hand.

The process calling `enter` must already be pid 1 of a fresh pid namespace (the zygote forks it
there, kernel/proc/zygote.py). It unshares the mount, network, IPC, UTS and cgroup namespaces,
builds a tmpfs root holding only the policy's paths at their host paths (the same table as
`launch.bwrap_argv`), pivots into it and drops the host's tree, so the result is the sandbox
bwrap would have made, with no exec.
"""

from __future__ import annotations

import ctypes
import os
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

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


def _check(rc: int, what: str) -> None:
    if rc != 0:
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


def _dirs_to(path: str) -> None:
    """Directories on the way to a mount point, 0755 (a 0700 /root would hide a runtime)."""
    for parent in [str(p) for p in reversed(Path(path).parents)][1:]:
        if not os.path.lexists(parent):
            os.mkdir(parent, 0o755)
            os.chmod(parent, 0o755)


def _bind(source: str, target: str, readonly: bool) -> None:
    _dirs_to(target)
    if not os.path.lexists(target):
        if os.path.isdir(source):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    mount(None, target, None, flags)


def _dev(root: str) -> None:
    dev = root + "/dev"
    _dirs_to(dev)
    os.mkdir(dev, 0o755)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for node in NODES:
        if os.path.exists(f"/oldroot/dev/{node}"):
            os.close(os.open(f"{dev}/{node}", os.O_CREAT | os.O_WRONLY, 0o666))
            mount(f"/oldroot/dev/{node}", f"{dev}/{node}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm", 0o1777)
    os.chmod(f"{dev}/shm", 0o1777)


def enter(policy: Policy, launcher_paths: list[str]) -> dict[str, object]:
    """Unshare and pivot into the agent's own tree; the caller is root and pid 1 of a new pid
    namespace. What the layer report says."""
    if os.getpid() != 1:
        raise RuntimeError("not the first process of a fresh pid namespace")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
                         | CLONE_NEWCGROUP), "unshare")
    _check(_libc.sethostname(b"agent", 5), "sethostname")
    mounts = table(policy, launcher_paths)
    for path, kind in mounts.items():
        if kind in ("ro", "rw") and os.path.realpath(path) != path and not (
                kind == "ro" and os.path.islink(path)):
            raise ValueError(f"{path} is reached through a symlink; name its real path")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A scratch root to stand on while the agent's is built: the host's tree stays reachable
    # at /oldroot until the last step drops it.
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.mkdir("/tmp/newroot", 0o755)
    os.mkdir("/tmp/oldroot", 0o755)
    pivot_root("/tmp", "/tmp/oldroot")
    os.chdir("/")
    root = "/newroot"
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for path, kind in sorted(mounts.items(), key=lambda item: (item[0].count("/"), item[0])):
        target = root + path
        if kind == "dev":
            _dev(root)
        elif kind == "proc":
            _dirs_to(target)
            os.mkdir(target, 0o555)
            mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif kind == "tmpfs":
            _dirs_to(target)
            os.mkdir(target, 0o1777)
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
                  f"mode=1777,size={policy.limits.tmp_bytes}")
        elif kind == "ro" and os.path.islink("/oldroot" + path):
            _dirs_to(target)
            os.symlink(os.readlink("/oldroot" + path), target)
        else:
            _bind("/oldroot" + path, target, kind == "ro")
    _check(_libc.umount2(b"/oldroot", MNT_DETACH), "umount /oldroot")
    os.chdir(root)
    pivot_root(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the scratch root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    forward.loopback_up()
    return {"via": "zygote", "unshared": ["mnt", "pid", "net", "ipc", "uts", "cgroup"]}
