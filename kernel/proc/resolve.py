"""Open a path the way a root launcher must before granting it: no symlink an agent planted.

Root follows any symlink, and a grant (a Landlock rule, a bind) lands on whatever the path
names at that moment. An agent that can write a directory on the path (its home, a parent's
home holding a child's code) could swap a component for a symlink to `/` or
`/proc/self/cwd` between the kernel's check and the launch. `open_path` walks the path one
component at a time with O_NOFOLLOW, relative to the directory already opened, and follows a
symlink only where nobody less privileged than this process could have put it: in a directory
owned by root (or this process's uid) that neither its group nor others may write. `/bin ->
usr/bin` is followed; a symlink in a home, or in a sticky `/tmp`, is refused with ELOOP.

`identity` (device, inode) of what was opened lets the launcher check it grants the very
directory the kernel resolved and checked (the policy's `pins`): that also catches a bind
that bubblewrap, resolving its source itself, made of something swapped in meanwhile.

Stdlib only: the launcher imports this before it drops privileges (`python -I -S`).
"""

from __future__ import annotations

import errno
import os
import stat

MAX_LINKS = 40  # as the kernel's own path walk


def _trusted_dir(fd: int) -> bool:
    st = os.fstat(fd)
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def open_path(path: str, parents: list[bool] | None = None) -> int:
    """An O_PATH fd on absolute `path`, reached through real directories and trusted symlinks
    only. Raises OSError: ELOOP for a symlink that could have been planted (or too many),
    ENOENT, ENOTDIR, EACCES as the walk meets them (the message names the component; callers
    name the path). `parents`, if given, gets whether each directory the walk passed through
    is one only root (or this process's uid) may change."""
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, "not an absolute path")
    todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    stack = [os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    links = 0
    try:
        while todo:
            part = todo.pop()
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            if parents is not None:
                parents.append(_trusted_dir(stack[-1]))
            fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many symlinks")
                if not _trusted_dir(stack[-1]):
                    owner = os.fstat(stack[-1]).st_uid
                    raise OSError(errno.ELOOP, f"{part!r} is a symlink in a directory that "
                                  f"uid {owner} or others can write; name the real path")
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                continue
            if todo and not stat.S_ISDIR(mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, f"{part!r} is not a directory")
            stack.append(fd)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def identity(fd: int) -> list[int]:
    """[device, inode] of an open file: what a pin records and the launcher compares."""
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]


def pin(path: str) -> list[int]:
    """The identity of what `open_path` reaches at `path` now (OSError naming `path`)."""
    return pin_trusted(path)[0]


def pin_trusted(path: str) -> tuple[list[int], bool]:
    """`pin(path)`, and whether only root could make the path reach something else (every
    directory on the walk is root's, or this process's uid's, and no one else may write it):
    such a pin stays true until root itself changes the tree."""
    parents: list[bool] = []
    try:
        fd = open_path(path, parents)
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from None
    try:
        return identity(fd), all(parents)
    finally:
        os.close(fd)
