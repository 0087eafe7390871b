"""The kernel's state directory: private layout, single-kernel lock, secret key."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
from pathlib import Path

from sdk import layout

KEY_BYTES = 32
# The name `write_private` gives its temporary: a kernel killed before the rename leaves it.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


class StateError(Exception):
    """The state directory cannot be used safely; the message says why and what to do."""


def _private_dir(path: Path, mode: int = 0o700) -> None:
    """Create `path` (0700) or check an existing one is ours and set its mode."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StateError(
            f"{path} belongs to uid {st.st_uid}, not to this kernel (uid {os.geteuid()})")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600, durable before it is visible."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sweep_temporaries(directory: Path) -> int:
    """Remove what `write_private` calls by a dead kernel left behind; how many. Only under the
    state lock: a live kernel's temporary would otherwise vanish before its rename."""
    swept = 0
    for entry in os.scandir(directory):
        if _TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            swept += 1
    return swept


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateDir:
    """Owns `<state>/`: `kernel.lock`, `secret.key`, `kernel.db`, `run/`, `agents/<id>/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = layout.run_dir(root)
        self.agents = root / "agents"
        self.db_path = root / "kernel.db"
        self.key_path = root / "secret.key"
        self.socket_path = layout.socket_path(root)
        self.admin_token_path = layout.admin_token_path(root)
        self._lock_fd: int | None = None
        # 0711 instead of 0700 on the directories above the agents' homes and endpoints, so
        # agents with uids of their own can pass through them (never list them) to reach those.
        self.traversable = False

    def open(self) -> None:
        """Create the layout and take the lock; refuse a second kernel on the same directory."""
        if len(str(self.socket_path)) > layout.MAX_IPC_PATH:
            raise StateError(
                f"socket path {self.socket_path} is longer than {layout.MAX_IPC_PATH} bytes; "
                "choose a shorter --state-dir")
        os.umask(0o077)
        for d in (self.root, self.run, self.agents):
            _private_dir(d, 0o711 if self.traversable else 0o700)
        fd = os.open(self.root / "kernel.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"another kernel is running on {self.root}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for d in (self.root, self.run, self.root / "remote"):
            if d.is_dir():
                sweep_temporaries(d)

    def secret_key(self) -> bytes:
        """The kernel's HMAC key, created once (0600) and never rewritten."""
        try:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            st = self.key_path.lstat()
            if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o077:
                raise StateError(f"{self.key_path} must be a regular file with mode 0600") from None
            key = self.key_path.read_bytes()
            if len(key) != KEY_BYTES:
                raise StateError(
                    f"{self.key_path} is damaged ({len(key)} bytes, want {KEY_BYTES})") from None
            return key
        key = secrets.token_bytes(KEY_BYTES)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key

    def agent_dir(self, agent_id: int, home: bool = True) -> Path:
        """`agents/<id>/`: kernel-owned; holds the agent's logs and its `home/` (created here
        for an agent of the kernel's uid; the sandbox gives others a home of their own uid)."""
        path = self.agents / str(agent_id)
        _private_dir(path, 0o711 if self.traversable else 0o700)
        if home:
            _private_dir(path / "home")
        return path

    def open_log(self, agent_id: int, stream: str, flags: int) -> int:
        """An fd on an agent's captured stream. The logs sit beside the agent's home, never in
        it, and O_NOFOLLOW refuses a symlink planted there to make the kernel read its key."""
        path = self.agents / str(agent_id) / stream
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
