"""Syscall errors as Python exceptions: one class per ABI error code."""

from __future__ import annotations

from sdk.abi import ErrorCode


class SyscallError(Exception):
    """A syscall the kernel answered with an error code."""

    code: ErrorCode = ErrorCode.EINVAL

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name


class PermissionDenied(SyscallError):
    code = ErrorCode.EPERM


class NotFound(SyscallError):
    code = ErrorCode.ENOENT


class TryAgain(SyscallError):
    code = ErrorCode.EAGAIN


class Busy(SyscallError):
    code = ErrorCode.EBUSY


class NoSpace(SyscallError):
    code = ErrorCode.ENOSPC


class InvalidArgument(SyscallError):
    code = ErrorCode.EINVAL


class NoSuchSyscall(SyscallError):
    code = ErrorCode.ENOSYS


class QuotaExceeded(SyscallError):
    code = ErrorCode.EQUOTA


class KernelFault(SyscallError):
    code = ErrorCode.EIO


class Canceled(SyscallError):
    code = ErrorCode.ECANCELED


class TimedOut(SyscallError):
    code = ErrorCode.ETIMEDOUT


class KernelUnavailable(SyscallError):
    """No kernel answered: the socket is missing or the kernel did not reply in time."""

    code = ErrorCode.ETIMEDOUT


_BY_CODE: dict[int, type[SyscallError]] = {
    cls.code: cls
    for cls in (
        PermissionDenied, NotFound, TryAgain, Busy, NoSpace, InvalidArgument, NoSuchSyscall,
        QuotaExceeded, KernelFault, Canceled, TimedOut,
    )
}


def from_code(code: int, message: str) -> SyscallError:
    """The exception for an error code; an unknown code keeps its number in the message."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return SyscallError(f"unknown error code {code}: {message}")
    return cls(message)
