"""The ABI codec is total: any bytes decode to a valid message or raise AbiError."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdk import abi
from tests.conftest import DEEP

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=20,
)


def _request(**over: object) -> abi.Request:
    fields = {"v": abi.ABI_VERSION, "id": 7, "call": "sys.null", "token": "t"} | over
    return abi.Request(**fields)  # type: ignore[arg-type]


def test_request_round_trip() -> None:
    args = abi.SpawnArgs(path="/x.py", name="bob", argv=["a"], caps=["sys.*"])
    req = _request(call="proc.spawn", args=msgspec.Raw(abi.encode(args)), timeout_ms=5)
    back = abi.decode_request(abi.encode(req))
    assert back.id == 7 and back.call == "proc.spawn" and back.timeout_ms == 5
    assert abi.decode_args(back.args, abi.SpawnArgs) == args


def test_reply_and_error_round_trip() -> None:
    ok = abi.decode_response(abi.encode(abi.Reply(3, msgspec.Raw(abi.encode([1, 2])))))
    assert isinstance(ok, abi.Reply) and abi.decode_result(ok.result) == [1, 2]
    err = abi.decode_response(abi.encode(abi.Error(4, abi.ErrorCode.EPERM, "no")))
    assert isinstance(err, abi.Error) and err.code == abi.ErrorCode.EPERM


@pytest.mark.parametrize("bad", [
    _request(v=2), _request(call="NOT-A-CALL"), _request(id=-1),
    _request(token="x" * (abi.MAX_TOKEN_CHARS + 1)),
])
def test_invalid_envelopes_are_refused(bad: abi.Request) -> None:
    with pytest.raises(abi.AbiError):
        abi.decode_request(abi.encode(bad))


def test_unknown_argument_fields_are_refused() -> None:
    raw = msgspec.Raw(abi.encode({"id": 1, "surprise": True}))
    with pytest.raises(abi.AbiError):
        abi.decode_args(raw, abi.AgentRef)


def test_request_id_is_recovered_from_bad_requests() -> None:
    assert abi.request_id_of(abi.encode([1, 42, "BAD", "t"])) == 42
    assert abi.request_id_of(b"\xc1garbage") == 0
    # A bool in the id position is not an id (found by the fuzzer: `[0, false]`).
    assert abi.request_id_of(b"\x92\x00\xc2") == 0
    assert type(abi.request_id_of(abi.encode([1, True]))) is int


@settings(max_examples=1000 * DEEP, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_abi_error(data: bytes) -> None:
    try:
        req = abi.decode_request(data)
    except abi.AbiError:
        return
    assert isinstance(req, abi.Request) and req.v == abi.ABI_VERSION


@settings(max_examples=800 * DEEP, deadline=None)
@given(msgpack_values, st.sampled_from([abi.SpawnArgs, abi.SendArgs, abi.WaitArgs, abi.LogsArgs,
                                        abi.KillArgs, abi.AgentRef, abi.NoArgs]))
def test_any_value_decodes_as_args_or_raises_abi_error(value: object, kind: type) -> None:
    try:
        raw = msgspec.Raw(abi.encode(value))
    except (OverflowError, TypeError):
        return  # not encodable as msgpack, so no peer could send it
    try:
        args = abi.decode_args(raw, kind)
    except abi.AbiError:
        return
    assert isinstance(args, kind)


@given(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(), st.binary(),
                 st.lists(st.integers(0, 9)), st.dictionaries(st.text(), st.booleans())))
def test_one_pass_reply_encoding_is_the_reply_struct(result: object) -> None:
    """The kernel encodes replies in one pass; the bytes must be exactly a `Reply`'s."""
    assert abi.encode_reply(7, result) == abi.encode(abi.Reply(7, msgspec.Raw(abi.encode(result))))
    memory = abi.Memory(id=1, namespace="n", content="c", metadata={"k": result},
                        created_at=0.0, updated_at=0.0)
    assert abi.encode_reply(8, memory) == abi.encode(abi.Reply(8, msgspec.Raw(abi.encode(memory))))
