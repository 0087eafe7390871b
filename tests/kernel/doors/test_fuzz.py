"""Hostile bytes at the kernel's ROUTER: every frame gets a typed answer and the kernel lives."""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.syscalls import SYSCALLS
from sdk import abi
from tests.conftest import DEEP, KernelProcess
from tests.sdk.test_abi import msgpack_values


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, zmq.Socket]]:
    """A kernel of its own (fuzzed admin calls may kill agents) and a raw DEALER to it. After
    the module's tests, in whatever order they ran: the kernel still answers, counted every
    hostile frame as EINVAL, never failed internally, and logged no traceback."""
    k = KernelProcess(tmp_path_factory.mktemp("fuzz") / "state").start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.connect(f"ipc://{k.state_dir}/run/kernel.sock")
    yield k, sock
    sock.close()
    with k.connect() as conn:
        assert conn.sys.null() is None
        stats = conn.sys.stats()
    assert stats.errors.get("EINVAL", 0) >= 2_500 * DEEP  # the random frames alone
    assert "EIO" not in stats.errors
    assert "Traceback" not in k.log()
    assert k.stop() == 0


def _answer(sock: zmq.Socket) -> abi.Reply | abi.Error:
    resp = abi.decode_response(sock.recv())
    assert not sock.poll(0), "more than one answer to one frame"
    return resp


@settings(max_examples=2_500 * DEEP, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=512))
def test_random_bytes_each_get_einval(target: tuple[KernelProcess, zmq.Socket],
                                      data: bytes) -> None:
    _, sock = target
    sock.send(data)
    resp = _answer(sock)
    assert isinstance(resp, abi.Error) and resp.code == abi.ErrorCode.EINVAL


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=64), min_size=2, max_size=5))
def test_random_multipart_frames_get_einval(target: tuple[KernelProcess, zmq.Socket],
                                            frames: list[bytes]) -> None:
    _, sock = target
    sock.send_multipart(frames)
    resp = _answer(sock)
    assert isinstance(resp, abi.Error) and resp.code == abi.ErrorCode.EINVAL


@settings(max_examples=1_000 * DEEP, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=st.sampled_from(sorted(SYSCALLS)), args=msgpack_values, with_token=st.booleans(),
       rid=st.integers(0, 2**63 - 1))
def test_random_arguments_never_hit_a_kernel_fault(target: tuple[KernelProcess, zmq.Socket],
                                                   call: str, args: object, with_token: bool,
                                                   rid: int) -> None:
    k, sock = target
    if call in ("proc.spawn", "proc.kill"):
        return  # valid random spawns/kills are legitimate work, not faults; covered elsewhere
    token = (k.state_dir / "admin.token").read_text().strip() if with_token else "forged"
    try:
        raw = msgspec.Raw(abi.encode(args))
    except (OverflowError, TypeError):
        return
    sock.send(abi.encode(abi.Request(v=abi.ABI_VERSION, id=rid, call=call, token=token, args=raw,
                                     timeout_ms=0)))
    resp = _answer(sock)
    assert resp.id == rid
    if isinstance(resp, abi.Error):
        assert resp.code != abi.ErrorCode.EIO, resp.message
        if not with_token:
            assert resp.code in (abi.ErrorCode.EPERM, abi.ErrorCode.EINVAL)


def test_oversized_message_drops_only_that_peer(target: tuple[KernelProcess, zmq.Socket]) -> None:
    k, _ = target
    big = zmq.Context.instance().socket(zmq.DEALER)
    big.linger = 0
    big.rcvtimeo = 1000
    big.connect(f"ipc://{k.state_dir}/run/kernel.sock")
    big.send(os.urandom(17 * 1024 * 1024))  # over the 16 MiB cap: libzmq cuts the connection
    with pytest.raises(zmq.Again):
        big.recv()
    big.close()
    with k.connect() as conn:
        assert conn.sys.null() is None
