"""Keeps a diary across its restarts: each start adds a line to a file in its namespace (kernel
storage) and to one in its home, prints both as JSON, then waits in a syscall for good."""

import json
import os

import sdk

home_diary = os.path.join(os.environ["HOME"], "diary.txt")
with sdk.connect() as conn:
    try:
        diary = conn.fs.read("diary.txt").decode()
    except sdk.SyscallError:
        diary = ""
    diary += f"start {diary.count(chr(10)) + 1}\n"
    conn.fs.write("diary.txt", diary)
    with open(home_diary, "a") as f:
        f.write(diary.splitlines()[-1] + "\n")
    with open(home_diary) as f:
        print(json.dumps({"fs": diary, "home": f.read()}), flush=True)
    conn.ipc.recv()
