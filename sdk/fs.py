"""The `fs` syscall family: the agent's own versioned files, and files others shared with it."""

from __future__ import annotations

from sdk import abi
from sdk.syscalls import Family


class Fs(Family):
    def read(self, path: str, *, version: int | None = None, owner: str | None = None) -> bytes:
        """The file's current bytes, or those of an older kept `version`. `owner` names
        another agent's namespace (needs a capability it shared)."""
        return self._call("fs.read", abi.FsReadArgs(path=path, version=version, owner=owner))

    def write(self, path: str, data: bytes | str, *, owner: str | None = None) -> abi.FsStat:
        """Replace the file atomically (a new version); parents are created as needed."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return self._call("fs.write", abi.FsWriteArgs(path=path, data=raw, owner=owner))

    def append(self, path: str, data: bytes | str, *, owner: str | None = None) -> abi.FsStat:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return self._call("fs.append", abi.FsWriteArgs(path=path, data=raw, owner=owner))

    def list(self, path: str = "", *, owner: str | None = None) -> list[abi.FsStat]:
        return self._call("fs.list", abi.FsPathArgs(path=path, owner=owner))

    def stat(self, path: str, *, owner: str | None = None) -> abi.FsStat:
        return self._call("fs.stat", abi.FsPathArgs(path=path, owner=owner))

    def mkdir(self, path: str, *, owner: str | None = None) -> abi.FsStat:
        return self._call("fs.mkdir", abi.FsPathArgs(path=path, owner=owner))

    def delete(self, path: str, *, owner: str | None = None) -> None:
        """Remove a file with all its versions, or an empty directory (irreversible)."""
        return self._call("fs.delete", abi.FsPathArgs(path=path, owner=owner))

    def versions(self, path: str, *, owner: str | None = None) -> list[abi.FsVersion]:
        return self._call("fs.versions", abi.FsPathArgs(path=path, owner=owner))

    def rollback(self, path: str, version: int | None = None, *, time: float | None = None,
                 owner: str | None = None) -> abi.FsStat:
        """Make `version` (or the version current at Unix `time`) current again, as a new
        version; nothing is lost."""
        args = abi.FsRollbackArgs(path=path, version=version, time=time, owner=owner)
        return self._call("fs.rollback", args)

    def share(self, path: str, to: str, rights: tuple[str, ...] = ("fs.read",), *,
              expires_in: float | None = None) -> str:
        """A capability token for agent `to` on `path` (and below), narrowed to `rights`.
        Hand it over (e.g. `ipc.send`); the receiver uses it with `Fs.shared(token)`."""
        args = abi.FsShareArgs(path=path, to=to, rights=list(rights), expires_in_s=expires_in)
        return self._call("fs.share", args)

    def search(self, query: str, k: int = 5, *, owner: str | None = None) -> list[abi.FsHit]:
        """The files whose text is closest in meaning to `query`."""
        return self._call("fs.search", abi.FsSearchArgs(query=query, k=k, owner=owner))

    def shared(self, token: str) -> Fs:
        """This family over a new connection that presents `token` (a share received from
        another agent); pass `owner=` the sharer's name on each call."""
        from sdk.client import Connection

        return Fs(Connection(self._conn.endpoint, token, timeout=self._conn.timeout))
