"""seccomp-bpf through libseccomp (ctypes): the syscalls an agent may never make."""

from __future__ import annotations

import ctypes
import errno
import functools
import os

# Native architectures whose syscall table the deny list below was checked against. Any other
# ABI reaching the filter (ia32 `int 0x80` and its socketcall(), x32, 32-bit arm) is killed.
ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

ACT_ALLOW = 0x7FFF0000
ACT_KILL_PROCESS = 0x80000000
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_TSYNC = 4
CMP_NE = 1
CMP_EQ = 4
CMP_MASKED_EQ = 7
AF_UNIX = 1  # the same on every Linux architecture (socket is not imported: launcher start-up)
AF_INET = 2
AF_INET6 = 10
CMP_GT = 6

# Denied outright with EPERM. Each line is a way out of the sandbox or into another process.
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "process_madvise",  # reach into other processes
    "io_uring_setup", "io_uring_enter", "io_uring_register",  # a second syscall path (sockets)
    "unshare", "setns",  # new namespaces, e.g. a user namespace with a fresh set of capabilities
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr",  # both mount APIs
    "bpf", "perf_event_open", "userfaultfd",  # kernel attack surface
    "keyctl", "add_key", "request_key",  # the kernel keyring is not namespaced
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl",
    "open_by_handle_at", "name_to_handle_at",  # open a file by handle, around path checks
    # The kernel kills an agent by its process group; no descendant may leave it.
    "setsid", "setpgid",
    # SysV IPC: objects named by a global key, outliving their creator, readable by any uid
    # their mode allows and counted by no rlimit. (`ipc`, the old multiplexer, exists only
    # on 32-bit ABIs, which the filter kills.)
    "shmget", "shmat", "shmdt", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "ipc",
)
# clone() flags that make namespaces: the same escape as unshare().
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000)


class SeccompError(OSError):
    """libseccomp is missing, the architecture is not covered, or the kernel refused a step."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


@functools.cache
def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise SeccompError(errno.ENOENT, f"libseccomp.so.2 not found: {exc}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_api_get.restype = ctypes.c_uint
    return lib


def unavailable() -> str | None:
    """Why this machine cannot filter syscalls as agents need, or None if it can."""
    machine = os.uname().machine
    if machine not in ARCHES:
        return f"architecture {machine} is not covered by the agent filter"
    try:
        lib = _library()
    except SeccompError as exc:
        return exc.strerror
    if lib.seccomp_arch_native() != ARCHES[machine]:
        return f"libseccomp's native architecture is not {machine}"
    # API level 3: the kernel has SECCOMP_RET_KILL_PROCESS, which the bad-arch action needs.
    level = lib.seccomp_api_get()
    if level < 3:
        return f"kernel or libseccomp too old (seccomp API level {level}, need 3)"
    return None


def errno_action(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class Filter:
    """A default-allow filter with rules; load() makes it permanent for this process tree."""

    def __init__(self) -> None:
        reason = unavailable()
        if reason:
            raise SeccompError(errno.ENOSYS, reason)
        self._lib = _library()
        self.ctx = self._lib.seccomp_init(ACT_ALLOW)
        if not self.ctx:
            raise SeccompError(errno.ENOMEM, "seccomp_init failed")
        self.rules = 0
        self._attr(_ATTR_ACT_BADARCH, ACT_KILL_PROCESS)
        self._attr(_ATTR_CTL_TSYNC, 1)

    def _attr(self, attr: int, value: int) -> None:
        rc = self._lib.seccomp_attr_set(self.ctx, attr, value)
        if rc < 0:
            raise SeccompError(-rc, f"seccomp_attr_set({attr}): {errno.errorcode.get(-rc)}")

    def deny(self, name: str, err: int, *conds: tuple[int, int, int, int]) -> bool:
        """Fail `name` with `err` (when all of `conds` hold); False if this arch lacks it."""
        nr = self._lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return False
        array = (_ArgCmp * max(len(conds), 1))(*(_ArgCmp(*c) for c in conds))
        rc = self._lib.seccomp_rule_add_array(self.ctx, errno_action(err), nr, len(conds), array)
        if rc < 0:
            raise SeccompError(-rc, f"seccomp rule for {name}: {errno.errorcode.get(-rc)}")
        self.rules += 1
        return True

    def load(self) -> None:
        rc = self._lib.seccomp_load(self.ctx)
        if rc < 0:
            raise SeccompError(-rc, f"seccomp_load: {errno.errorcode.get(-rc, rc)}")

    def release(self) -> None:
        if self.ctx:
            self._lib.seccomp_release(self.ctx)
            self.ctx = None


def agent_filter(inet: bool = False) -> Filter:
    """The agent's filter: DENIED, namespace clones, and every socket family but AF_UNIX (and
    with `inet` AF_INET/AF_INET6: only for a process in a network namespace of its own, whose
    one interface is its own loopback, where the in-sandbox bridge listens)."""
    f = Filter()
    for name in DENIED:
        f.deny(name, errno.EPERM)
    # Landlock covers TCP only; this also stops UDP, raw, netlink, vsock and the rest.
    for call in ("socket", "socketpair"):
        if not inet:
            f.deny(call, errno.EPERM, (0, CMP_NE, AF_UNIX, 0))
            continue
        # One comparison per rule (libseccomp's rule on one argument): every family but
        # AF_UNIX (1), AF_INET (2) and AF_INET6 (10).
        for family in (0, *range(AF_INET + 1, AF_INET6)):
            f.deny(call, errno.EPERM, (0, CMP_EQ, family, 0))
        f.deny(call, errno.EPERM, (0, CMP_GT, AF_INET6, 0))
    for flag in NAMESPACE_FLAGS:
        f.deny("clone", errno.EPERM, (0, CMP_MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory the filter cannot read; ENOSYS makes libc use clone().
    f.deny("clone3", errno.ENOSYS)
    return f
