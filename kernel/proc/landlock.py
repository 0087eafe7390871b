"""Landlock through raw syscalls (ctypes): confine a process to a few file trees, no TCP."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable

# The three syscalls have the same numbers on every architecture (the unified table).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

# The filesystem rights each ABI knows; a ruleset handles all of them, so whatever a rule does
# not grant is denied.
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1,
              5: (1 << 16) - 1}
# Rights that make sense on a file (the rest only on directories; the kernel refuses them).
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

READ_ONLY = EXECUTE | READ_FILE | READ_DIR
# A home: everything but exec (what an agent writes it may not run) and device nodes.
READ_WRITE = (READ_FILE | READ_DIR | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG
              | MAKE_SOCK | MAKE_FIFO | MAKE_SYM | REFER | TRUNCATE)
DEVICE = READ_FILE | WRITE_FILE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _pack_ = 1  # packed: 16 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class LandlockError(OSError):
    """Landlock is missing or refused a step; the message names the step."""


def _fail(step: str) -> LandlockError:
    err = ctypes.get_errno()
    return LandlockError(err, f"landlock {step}: {os.strerror(err)}")


def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when it has none (ENOSYS) or it is disabled (EOPNOTSUPP)."""
    abi = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(abi), 0)


class Ruleset:
    """A ruleset built while the process may still open anything, enforced later."""

    def __init__(self, abi: int) -> None:
        if abi < 1:
            raise LandlockError(errno.ENOSYS, "landlock is not available in this kernel")
        self.abi = abi
        self.fs = _FS_BY_ABI[min(abi, 5)]
        self.net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
        self.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
        # Older kernels reject a struct longer than they know, so pass only the known prefix.
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        attr = _RulesetAttr(self.fs, self.net, self.scoped)
        fd = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
        if fd < 0:
            raise _fail("create_ruleset")
        self.fd = int(fd)
        self.ports: list[int] = []

    def allow(self, path: str, access: int, fd: int | None = None) -> None:
        """Grant `access` beneath `path` (a file gets only the rights files can have); with
        `fd`, beneath what that O_PATH fd names (the caller opened and checked it)."""
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC) if fd is None else fd
        except OSError as exc:
            raise LandlockError(exc.errno, f"landlock: cannot open {path}: {exc.strerror}") \
                from None
        try:
            if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                access &= _FILE_RIGHTS
            rule = _PathBeneathAttr(access & self.fs, pfd)
            if _libc.syscall(_SYS_ADD_RULE, self.fd, _RULE_PATH_BENEATH, ctypes.byref(rule),
                             ctypes.c_uint32(0)) != 0:
                raise _fail(f"add_rule {path}")
        finally:
            if fd is None:
                os.close(pfd)

    def allow_connect(self, port: int) -> None:
        """Let TCP connect() reach `port` (on any address: meant for a process whose network
        namespace has only its own loopback). A no-op where Landlock has no TCP rules."""
        if not self.net:
            return
        rule = _NetPortAttr(NET_CONNECT_TCP, port)
        if _libc.syscall(_SYS_ADD_RULE, self.fd, _RULE_NET_PORT, ctypes.byref(rule),
                         ctypes.c_uint32(0)) != 0:
            raise _fail(f"add_rule tcp connect {port}")
        self.ports.append(port)

    def allow_all(self, paths: Iterable[str], access: int) -> None:
        for path in paths:
            self.allow(path, access)

    def restrict_self(self) -> None:
        """Enforce on this thread and what it execs; needs no_new_privs (or CAP_SYS_ADMIN)."""
        if _libc.syscall(_SYS_RESTRICT_SELF, self.fd, ctypes.c_uint32(0)) != 0:
            raise _fail("restrict_self")
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> dict[str, object]:
        scopes = [name for bit, name in ((SCOPE_ABSTRACT_UNIX_SOCKET, "abstract_unix_socket"),
                                         (SCOPE_SIGNAL, "signal")) if self.scoped & bit]
        return {"abi": self.abi, "tcp_denied": bool(self.net), "scopes": scopes,
                **({"tcp_connect": self.ports} if self.ports else {})}
