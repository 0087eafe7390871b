"""Runs the syscalls its task lists (JSON: [[name, args], ...]) and returns, per call, its
result or its error code: one agent that can probe memory and fs syscalls as itself.

`ipc.send` with data "$last" sends the previous call's result; `ipc.recv` keeps what it got,
and a later `"token": "$received"` presents that as the call's token."""

import json

import msgspec

from sdk import Agent, SyscallError, abi

ARGS = {
    "memory.add": abi.MemoryAddArgs, "memory.get": abi.MemoryRef,
    "memory.update": abi.MemoryUpdateArgs, "memory.delete": abi.MemoryRef,
    "memory.list": abi.MemoryListArgs, "memory.search": abi.MemorySearchArgs,
    "fs.read": abi.FsReadArgs, "fs.write": abi.FsWriteArgs, "fs.append": abi.FsWriteArgs,
    "fs.list": abi.FsPathArgs, "fs.stat": abi.FsPathArgs, "fs.delete": abi.FsPathArgs,
    "fs.mkdir": abi.FsPathArgs, "fs.versions": abi.FsPathArgs,
    "fs.rollback": abi.FsRollbackArgs, "fs.share": abi.FsShareArgs,
    "fs.search": abi.FsSearchArgs, "ipc.send": abi.SendArgs, "ipc.recv": abi.RecvArgs,
}


class Calls(Agent):
    def run(self, task: str) -> list:
        out: list = []
        received = last = None
        for name, args in json.loads(task):
            conn = self.conn
            if "token" in args:  # present a token someone shared instead of our own
                token = args.pop("token")
                conn = type(self.conn)(self.conn.endpoint,
                                       received if token == "$received" else token)
            if name == "ipc.send" and args.get("data") == "$last":
                args["data"] = last
            elif "data" in args:
                args["data"] = args["data"].encode()
            try:
                result = conn.call(name, msgspec.convert(args, ARGS[name]))
                if name == "ipc.recv":
                    received = result = msgspec.convert(result, abi.Message).data
                if isinstance(result, bytes):
                    result = result.decode(errors="replace")
                last = msgspec.to_builtins(result)
                out.append({"ok": last})
            except SyscallError as exc:
                out.append({"err": exc.code.name, "msg": exc.message})
        return out
