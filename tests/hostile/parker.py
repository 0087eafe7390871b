"""Hostile agent: once a message says go, parks as many `ipc.recv` calls as the kernel lets it,
over raw ZeroMQ (argv: tries, connections), counts the answers it gets by code, reports them as
one JSON line, then sleeps until it is killed with its calls still parked."""

import collections
import json
import os
import sys
import time

import msgspec
import zmq

import sdk
from sdk import abi, layout

with sdk.connect() as conn:
    conn.ipc.recv()
tries, conns = int(sys.argv[1]), int(sys.argv[2])
ctx = zmq.Context()
socks = []
poller = zmq.Poller()
for _ in range(conns):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(os.environ[layout.ENV_ENDPOINT])
    poller.register(sock, zmq.POLLIN)
    socks.append(sock)
token = os.environ[layout.ENV_TOKEN]
args = msgspec.Raw(abi.encode(abi.RecvArgs(timeout_ms=24 * 3600 * 1000)))  # a day
codes: collections.Counter[str] = collections.Counter()


def drain(timeout_ms: int) -> int:
    got = 0
    for sock, _ in poller.poll(timeout_ms):
        while True:
            try:
                msg = abi.decode_response(sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            codes[abi.ErrorCode(msg.code).name if isinstance(msg, abi.Error) else "ok"] += 1
            got += 1
    return got


start = time.monotonic()
for i in range(tries):
    data = abi.encode(abi.Request(v=abi.ABI_VERSION, id=i + 1, call="ipc.recv", token=token,
                                  args=args))
    sock = socks[i % conns]
    while True:
        try:
            sock.send(data, zmq.NOBLOCK)
            break
        except zmq.Again:  # our send queue is full: read answers while the kernel catches up
            drain(10)
    if i % 512 == 0:
        drain(0)
sent_s = time.monotonic() - start
while drain(2000):
    pass
print(json.dumps({"tries": tries, "codes": dict(codes), "send_s": round(sent_s, 3)}), flush=True)
time.sleep(3600)
