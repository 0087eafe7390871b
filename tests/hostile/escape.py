"""Hostile agent: tries every way out it knows and prints one JSON line of outcomes."""

import ctypes
import errno
import json
import os
import platform
import signal
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CLONE_NEWUSER = 0x10000000
SYS = {  # x86_64 / aarch64 numbers of the calls that have no Python wrapper
    "x86_64": {"clone": 56, "clone3": 435, "io_uring_setup": 425, "bpf": 321,
               "userfaultfd": 323, "process_vm_readv": 310, "add_key": 248,
               "perf_event_open": 298},
    "aarch64": {"clone": 220, "clone3": 435, "io_uring_setup": 425, "bpf": 280,
                "userfaultfd": 282, "process_vm_readv": 270, "add_key": 217,
                "perf_event_open": 241},
}[platform.machine()]


def attempt(fn):
    """None if the attack worked, else the name of the errno it failed with."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return None


def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def raw(name, *args):
    """A raw syscall; OSError when it fails."""
    # Whole registers: a variadic int would leave the upper half of a long argument undefined.
    ret = libc.syscall(ctypes.c_long(SYS[name]),
                       *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def read(path):
    with open(path, "rb") as f:
        f.read()


def write(path):
    with open(path, "wb") as f:
        f.write(b"pwned")


def connect_unix(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(address)


def connect_tcp(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))


def send_udp(port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", port))


def inherited_tcp(fd, port):
    s = socket.socket(fileno=fd)
    s.settimeout(2)
    s.connect(("127.0.0.1", port))


def ptrace_parent():
    parent = os.getppid()
    if libc.ptrace(16, parent, None, None) != 0:  # PTRACE_ATTACH
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    libc.ptrace(17, parent, None, None)  # PTRACE_DETACH: it worked, do no harm


def with_child(fn):
    """fn(pid) on a child of ours: ptrace and process_vm_* would normally be allowed on it."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        signal.pause()
        os._exit(0)
    try:
        fn(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def ptrace_child(pid):
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def vm_read_child(pid):
    buf = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
    remote = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)  # the same address in the child
    raw("process_vm_readv", pid, local, 1, remote, 1, 0)


def clone_newuser():
    if raw("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0) == 0:
        os._exit(0)  # the child of a clone that should never have worked


def unshare():
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mount():
    target = os.path.join(os.environ["HOME"], "mnt")  # harmless should it ever work
    os.makedirs(target, exist_ok=True)
    if libc.mount(b"none", target.encode(), b"tmpfs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def io_uring():
    params = ctypes.create_string_buffer(120)
    os.close(raw("io_uring_setup", 8, params))


def in_child(fn):
    """Run fn in a forked child; the signal that killed it, or None if it exited."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def ia32_socketcall():
    """socket(AF_INET) through the 32-bit ABI (int 0x80, socketcall) from a 64-bit process."""
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, 4096, 7, 0x02 | 0x20 | 0x40, -1, 0)  # rwx, private, anon, 32-bit
    args = addr + 256
    ctypes.memmove(args, struct.pack("<III", socket.AF_INET, socket.SOCK_STREAM, 0), 12)
    code = (b"\x53\xb8\x66\x00\x00\x00\xbb\x01\x00\x00\x00\xb9" + struct.pack("<I", args)
            + b"\xcd\x80\x5b\xc3")  # push rbx; eax=102; ebx=SYS_SOCKET; ecx=args; int 0x80
    ctypes.memmove(addr, code, len(code))
    fd = ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
    os._exit(3 if fd >= 0 else 4)


def x32_socket():
    libc.syscall(0x40000000 | 41, socket.AF_INET, socket.SOCK_STREAM, 0)
    os._exit(4)


def main():
    if os.getuid() == 0:  # as root most of these would work, on the real machine
        print(json.dumps({"refused": "running as root"}), flush=True)
        sys.exit(3)
    t = json.loads(sys.argv[1])
    out = {
        "read_secret": attempt(lambda: read(t["secret"])),
        "read_world_readable": attempt(lambda: read(t["leak"])),
        "list_state": listing(t["state"]),
        "read_other_home": attempt(lambda: read(t["other_home"] + "/notes")),
        "write_other_home": attempt(lambda: write(t["other_home"] + "/pwned")),
        "write_world_writable": attempt(lambda: write(t["public"] + "/pwned")),
        "tcp_connect": attempt(lambda: connect_tcp(t["tcp_port"])),
        "udp_send": attempt(lambda: send_udp(t["tcp_port"])),
        "inet6": attempt(lambda: socket.socket(socket.AF_INET6).close()),
        "netlink": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
        "inherited_tcp": attempt(lambda: inherited_tcp(t["inet_fd"], t["tcp_port"])),
        "unix_other": attempt(lambda: connect_unix(t["other_socket"])),
        "unix_abstract": attempt(lambda: connect_unix(t["abstract"])),
        "signal_sibling": attempt(lambda: os.kill(t["sibling"], signal.SIGTERM)),
        "ptrace_parent": attempt(ptrace_parent),
        "ptrace_child": attempt(lambda: with_child(ptrace_child)),
        "process_vm_readv": attempt(lambda: with_child(vm_read_child)),
        "clone_newuser": attempt(clone_newuser),
        "unshare": attempt(unshare),
        "clone3": attempt(lambda: raw("clone3", 0, 0)),
        "mount": attempt(mount),
        "io_uring": attempt(io_uring),
        "bpf": attempt(lambda: raw("bpf", 0, 0, 0)),
        "userfaultfd": attempt(lambda: os.close(raw("userfaultfd", 1))),  # user-mode only
        "add_key": attempt(lambda: raw("add_key", b"user", b"k", b"v", 1, -3)),
        "perf_event_open": attempt(lambda: raw("perf_event_open", 0, 0, -1, -1, 0)),
        "setsid": attempt(os.setsid),
    }
    if platform.machine() == "x86_64":
        out["ia32_socketcall_signal"] = in_child(ia32_socketcall)
        out["x32_socket_signal"] = in_child(x32_socket)
    print(json.dumps(out), flush=True)


main()
