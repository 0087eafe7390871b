"""`conn.batch()`: many syscalls submitted together, each answered on its own (over ZeroMQ here;
over the rings in tests/kernel/doors/test_rings_kernel.py)."""

from __future__ import annotations

import os

import pytest

import sdk
from sdk import abi


def test_batch_results_come_back_in_order_with_their_own_errors(admin: sdk.Connection) -> None:
    with admin.batch() as b:
        null = b.sys.null()
        stats = b.sys.stats()
        missing = b.proc.info(10**9)
        nosys = b.call("nope.nothing")
        many = [b.sys.null() for _ in range(200)]
    assert null.done and null.result() is None
    assert isinstance(stats.result(), abi.Stats)
    with pytest.raises(sdk.SyscallError) as err:
        missing.result()
    assert err.value.code == abi.ErrorCode.ENOENT
    with pytest.raises(sdk.SyscallError) as err:
        nosys.result()
    assert err.value.code == abi.ErrorCode.ENOSYS
    assert all(p.result() is None for p in many)


def test_batch_misuse_is_refused(admin: sdk.Connection) -> None:
    b = admin.batch()
    pending = b.sys.null()
    with pytest.raises(sdk.InvalidArgument):
        pending.result()  # not submitted yet
    with pytest.raises(sdk.InvalidArgument):
        b.llm.stream([{"role": "user", "content": "hi"}])
    assert len(b) == 1
    assert b.submit() == [pending] and pending.result() is None
    assert b.submit() == [] and len(b) == 0  # submitted calls leave the batch


def test_a_batch_left_by_an_exception_is_not_sent(admin: sdk.Connection) -> None:
    me = f"user:{os.getuid()}"  # this caller's count: agents of other tests may call too
    before = admin.sys.stats().callers[me]["syscalls"]
    with pytest.raises(RuntimeError):
        with admin.batch() as b:
            pending = b.proc.info(1)
            raise RuntimeError("changed my mind")
    assert not pending.done
    assert admin.sys.stats().callers[me]["syscalls"] == before + 1  # the stats call alone
