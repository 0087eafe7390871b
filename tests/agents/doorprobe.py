"""Probes the kernel's door limits as an agent and returns what it saw (argv[1] picks):
`stats`: its own sys.stats; `oversize`: a request over the ABI's size limit through the SDK,
then a raw frame over it, then whether the kernel still answers; `limit N`: an fs.write of N
bytes through the SDK (over a kernel's lower max_message_bytes)."""

import os
import sys

import msgspec
import zmq

import sdk
from sdk import abi, layout


def outcome(fn, *args):
    try:
        return ["ok", msgspec.to_builtins(fn(*args))]
    except sdk.SyscallError as exc:
        return ["error", exc.code.name, exc.message]


def oversize(conn: sdk.Connection) -> dict:
    seen = {"sdk": outcome(conn.fs.write, "big", b"x" * abi.MAX_MESSAGE_BYTES),
            "null_after": outcome(conn.sys.null)}
    # Without the SDK's check: just over the limit is read and refused (EINVAL); far over it,
    # libzmq drops the connection unread and nothing comes back.
    for key, size in (("raw_just_over", abi.MAX_MESSAGE_BYTES + 1),
                      ("raw_far_over", abi.MAX_MESSAGE_BYTES + (1 << 16))):
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(os.environ[layout.ENV_ENDPOINT])
        raw.send(b"\x00" * size)
        seen[key] = abi.ErrorCode(abi.decode_response(raw.recv()).code).name if raw.poll(
            1000) else None
        raw.close()
    with sdk.connect() as again:
        seen["new_connection"] = outcome(again.sys.null)
    seen["same_connection"] = outcome(conn.sys.null)
    return seen


with sdk.connect() as conn:
    mode = sys.argv[1]
    if mode == "stats":
        conn.sys.null()  # a finished call of its own to see
        result = msgspec.to_builtins(conn.sys.stats())
    elif mode == "limit":
        result = {"write": outcome(conn.fs.write, "big", b"x" * int(sys.argv[2])),
                  "null_after": outcome(conn.sys.null)}
    else:
        result = oversize(conn)
    conn.proc.exit(result)
