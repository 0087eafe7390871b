"""The strict tier's root built in two stages (kernel/proc/mounts.py), driven directly: a
process prepared before its agent is known must end up with exactly its policy's tree, seeing
the host as it is when the agent starts, not as it was when the spare was made."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.proc import mounts
from kernel.proc.sandbox import Policy, default_readable

CLONE_NEWPID = 0x20000000
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not mounts.can_open_trees(),
    reason="needs root and open_tree(2) (Linux 5.2)")


@pytest.fixture
def place() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="agentos-mounts-"))
    for name in ("home", "code", "secret"):
        (base / name).mkdir()
    (base / "code" / "agent.py").write_text("print('hi')\n")
    (base / "secret" / "key").write_text("not for agents\n")
    yield base
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(str(base / "home").encode(), 2)
    shutil.rmtree(base)


def staged(shared: dict[str, str], policy: Policy, between: Any,
           probe: list[str]) -> dict[str, Any]:
    """Fork pid 1 of a fresh pid namespace that prepares with `shared`; run `between()` here
    (the host changing meanwhile); let it finish with `policy`, then report what each path
    of `probe` is in its root: "dir", "file", "missing", or the file's text."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    host_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    assert libc.unshare(CLONE_NEWPID) == 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(go_w)
            os.close(out_r)
            made = mounts.prepare(shared)
            os.write(out_w, b"p")
            os.read(go_r, 1)
            result: dict[str, Any] = {"report": mounts.finish(policy, [], made, host_mnt)}
            for path in probe:
                if os.path.isdir(path):
                    result[path] = "dir"
                elif os.path.isfile(path):
                    result[path] = Path(path).read_text()
                else:
                    result[path] = "missing"
            with open("/proc/self/mountinfo") as f:
                result["mounts"] = [line.split()[4] for line in f]
            st = os.statvfs("/tmp")
            result["tmp_bytes"] = st.f_blocks * st.f_frsize
            os.write(out_w, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    assert libc.setns(own, CLONE_NEWPID) == 0
    os.close(own)
    os.close(go_r)
    os.close(out_w)
    try:
        assert os.read(out_r, 1) == b"p", "prepare failed"
        between()
        os.write(go_w, b"g")
        data = b""
        while chunk := os.read(out_r, 65536):
            data += chunk
    finally:
        os.close(go_w)
        os.close(out_r)
        os.close(host_mnt)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return json.loads(data)


def test_a_prepared_root_gets_the_agents_paths_as_the_host_has_them_at_its_start(
        place: Path) -> None:
    """The home is mounted on the host after the spare prepared (as a home with a quota is,
    at the spawn): the agent sees that mount, its code, the shared runtime, nothing else of
    the host, and a /tmp of its own size."""
    readable = default_readable(str(place / "code"))
    shared = mounts.shared(default_readable(), [])
    policy = Policy(tier="strict", uid=12345, gid=12345, home=str(place / "home"),
                    readable=readable)

    def mount_home() -> None:
        mounts.mount("tmpfs", str(place / "home"), "tmpfs", 0, "size=1m")
        (place / "home" / "notes").write_text("mounted after the spare\n")

    seen = staged(shared, policy, mount_home,
                  [str(place / "home" / "notes"), str(place / "code" / "agent.py"),
                   str(place / "secret"), "/usr", "/etc/passwd", "/oldroot", "/newroot"])
    assert seen[str(place / "home" / "notes")] == "mounted after the spare\n"
    assert seen[str(place / "code" / "agent.py")] == "print('hi')\n"
    assert seen["/usr"] == "dir"
    for hidden in (str(place / "secret"), "/etc/passwd", "/oldroot", "/newroot"):
        assert seen[hidden] == "missing", hidden
    assert seen["report"]["prepared"] == len(shared)
    assert seen["tmp_bytes"] == policy.limits.tmp_bytes
    allowed = set(mounts.table(policy, []))
    assert set(seen["mounts"]) - {"/", *[f"/dev/{n}" for n in mounts.NODES]} <= allowed


def test_a_prepared_path_the_policy_does_not_list_is_never_shown(place: Path) -> None:
    """A spare prepared for more than this agent's policy (a shared path it does not list):
    the root is built again from the host, without it."""
    shared = mounts.shared((*default_readable(), str(place / "secret")), [])
    readable = default_readable(str(place / "code"))
    policy = Policy(tier="strict", uid=12345, gid=12345, home=str(place / "home"),
                    readable=readable)
    seen = staged(shared, policy, lambda: None,
                  [str(place / "secret" / "key"), str(place / "code" / "agent.py"), "/usr"])
    assert seen[str(place / "secret" / "key")] == "missing"
    assert seen[str(place / "code" / "agent.py")] == "print('hi')\n"
    assert seen["/usr"] == "dir"
    assert seen["report"]["prepared"] == 0  # nothing of the prepared root was used
