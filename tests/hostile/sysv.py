"""Hostile agent: passes data to another uid through SysV IPC (no capability involved) and
leaves segments behind; prints one JSON line of outcomes (`ok` means the attempt worked).

argv: `put KEY DATA` creates a 0666 segment, queue and semaphore set under KEY and fills
them, then hoards private segments meant to outlive it; `get KEY` reads what `put` left."""

import ctypes
import errno
import json
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.msgrcv.restype = ctypes.c_ssize_t
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long,
                        ctypes.c_int]
libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
IPC_CREAT, IPC_PRIVATE, IPC_NOWAIT = 0o1000, 0, 0o4000
SIZE = 4096


def check(ret):
    if ret == -1 or ret == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, errno.errorcode.get(err, str(err)))
    return ret


def attempt(fn, *args):
    try:
        return fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


class Message(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 64)]


def shm_put(key, data):
    shmid = check(libc.shmget(key, SIZE, IPC_CREAT | 0o666))
    addr = check(libc.shmat(shmid, None, 0))
    ctypes.memmove(addr, data, len(data))
    libc.shmdt(ctypes.c_void_p(addr))
    return "ok"


def shm_get(key):
    shmid = check(libc.shmget(key, 0, 0))
    addr = check(libc.shmat(shmid, None, 0o10000))  # SHM_RDONLY
    data = ctypes.string_at(addr, 64).rstrip(b"\0").decode()
    libc.shmdt(ctypes.c_void_p(addr))
    return data


def msg_put(key, data):
    qid = check(libc.msgget(key, IPC_CREAT | 0o666))
    msg = Message(1, data)
    check(libc.msgsnd(qid, ctypes.byref(msg), len(data), IPC_NOWAIT))
    return "ok"


def msg_get(key):
    qid = check(libc.msgget(key, 0))
    msg = Message()
    n = check(libc.msgrcv(qid, ctypes.byref(msg), 64, 0, IPC_NOWAIT))
    return msg.mtext[:n].decode()


def sem_put(key):
    check(libc.semget(key, 1, IPC_CREAT | 0o666))
    return "ok"


def sem_get(key):
    check(libc.semget(key, 0, 0))
    return "ok"


def hoard():
    """Private segments nobody attaches: memory that no rlimit of the agent counts."""
    made = 0
    for _ in range(3):
        check(libc.shmget(IPC_PRIVATE, 32 << 20, IPC_CREAT | 0o600))
        made += 1
    return made


mode, key = sys.argv[1], int(sys.argv[2])
if mode == "put":
    data = sys.argv[3].encode()
    out = {"shm": attempt(shm_put, key, data), "msg": attempt(msg_put, key, data),
           "sem": attempt(sem_put, key), "hoard": attempt(hoard)}
else:
    out = {"shm": attempt(shm_get, key), "msg": attempt(msg_get, key),
           "sem": attempt(sem_get, key)}
print(json.dumps(out), flush=True)
