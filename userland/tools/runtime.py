"""The tool process: load one tool module, then answer the kernel's calls over an inherited fd.

Runs inside the sandbox the kernel launched it in, for many calls (a persistent tool process).
Frames both ways are a 4-byte big-endian length and a JSON object. Whatever the tool prints is
captured per call, capped, and returned with the result, so prints never reach the protocol.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import sys
import time
import traceback
from typing import Any

STDOUT_CAP = 64 * 1024


class ToolError(Exception):
    """A tool's own refusal: returned to the caller as an error result, not a crash."""


class CappedText(io.TextIOBase):
    """A text sink that keeps the first `cap` characters and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.cap, self.parts, self.size, self.dropped = cap, [], 0, 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        room = self.cap - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def text(self) -> str:
        out = "".join(self.parts)
        return out + (f"\n[{self.dropped} more characters dropped]" if self.dropped else "")


CAP_DAC_READ_SEARCH = 2


def drop_privileges(read_files: bool = False) -> None:
    """Give up every capability for good, when the sandbox left us root (the confined tier
    keeps the kernel's uid): lock root out of regaining them at exec (securebits), empty the
    bounding and ambient sets, then the process's own. Root's file access then follows plain
    file permissions within Landlock's grant, and rlimits can no longer be raised.
    `read_files` keeps CAP_DAC_READ_SEARCH alone, for a tool that reads the calling agent's
    files (each agent has a uid of its own); Landlock still decides where it may read."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    noroot = 0x1 | 0x2 | 0x4 | 0x8 | 0x20  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS: all locked
    if libc.prctl(28, noroot, 0, 0, 0) != 0:  # PR_SET_SECUREBITS
        raise OSError(ctypes.get_errno(), "PR_SET_SECUREBITS")
    cap = 0
    while (cap == CAP_DAC_READ_SEARCH and read_files) or libc.prctl(24, cap, 0, 0, 0) == 0:
        cap += 1  # PR_CAPBSET_DROP, until past the last cap
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)
    kept = (1 << CAP_DAC_READ_SEARCH) if read_files else 0
    want = (Data * 2)()
    want[0].effective = want[0].permitted = kept
    if libc.capset(ctypes.byref(header), want) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    # /proc may be out of Landlock's grant: ask the kernel directly.
    now = (Data * 2)()
    if libc.capget(ctypes.byref(header), now) != 0 or any(
            (d.effective | d.permitted) & ~(kept if i == 0 else 0) or d.inheritable
            for i, d in enumerate(now)) or libc.prctl(
            23, 0, 0, 0, 0) != 0:  # PR_CAPBSET_READ of the first capability
        raise RuntimeError("capabilities are left after dropping them")


def read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def send(fd: int, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, default=str, separators=(",", ":")).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("agentos_tool", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load a tool from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["agentos_tool"] = module
    spec.loader.exec_module(module)
    return module


def serve(fd: int, module: Any) -> None:
    while True:
        head = read_exact(fd, 4)
        if head is None:
            return  # the kernel closed its end: this tool process is no longer wanted
        body = read_exact(fd, struct.unpack(">I", head)[0])
        if body is None:
            return
        request = json.loads(body)
        out = CappedText(STDOUT_CAP)
        real = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        start = time.perf_counter()
        try:
            value = module.run(request["args"], request.get("ctx", {}))
            reply = {"ok": True, "value": value}
        except ToolError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" (line {tb[0].lineno})" if tb else ""
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}{where}"}
        finally:
            sys.stdout, sys.stderr = real
        reply["tool_ms"] = round((time.perf_counter() - start) * 1000, 3)
        reply["stdout"] = out.text()
        try:
            send(fd, reply)
        except (TypeError, ValueError) as exc:
            send(fd, {"ok": False, "error": f"result is not JSON: {exc}",
                      "tool_ms": reply["tool_ms"], "stdout": reply["stdout"]})


def main() -> None:
    """`FD TOOL_FILE`: serve the tool on FD; `--exec PROGRAM ARGS...`: drop privileges and
    become PROGRAM (an MCP server)."""
    read_files = sys.argv[1] == "--read-files"
    if read_files:
        del sys.argv[1]
    drop_privileges(read_files)
    if sys.argv[1] == "--exec":
        os.execv(sys.argv[2], sys.argv[2:])
    fd, path = int(sys.argv[1]), sys.argv[2]
    serve(fd, load(path))


if __name__ == "__main__":
    main()
