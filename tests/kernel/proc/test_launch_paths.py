"""The root launcher grants only what the kernel checked (issue 15, the Landlock bypass on
restart): no symlink an agent could plant is followed (kernel/proc/resolve.py), and a pinned
path must still be the very directory the kernel resolved. Real launcher processes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from kernel.proc import resolve, sandbox
from kernel.proc.sandbox import Launch, LaunchExit, Policy
from kernel.proc.spawner import Sandboxes
from tests.kernel.proc.test_sandbox import (
    agent_python,
    base,  # noqa: F401 - the fixture
    cleanup,
    make_policy,
    need_tier,
    needs_root,
    run_agent,
    uid_for,
)

LIST = "import json, os, sys; print(json.dumps(sorted(os.listdir(sys.argv[1]))))"


def test_open_path_follows_only_symlinks_root_placed(base: Path) -> None:  # noqa: F811
    # /bin -> usr/bin and the like: in a directory only root writes.
    root_link = base / "lib-link"
    root_link.symlink_to("../" + base.name + "/real")
    (base / "real").mkdir()
    assert resolve.pin(str(root_link)) == resolve.pin(str(base / "real"))
    assert resolve.pin("/proc/self/..") == resolve.pin("/proc")
    # The same symlink in a directory another uid can write: refused, whoever planted it.
    agent_dir = base / "agent-home"
    agent_dir.mkdir()
    os.chown(agent_dir, 4242, 4242)
    (agent_dir / "sub").symlink_to("/")
    with pytest.raises(OSError) as err:
        resolve.open_path(str(agent_dir / "sub" / "etc"))
    assert err.value.errno == errno.ELOOP and "'sub'" in str(err.value)
    # ...and in a directory anyone may write (sticky, like /tmp).
    shared = base / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    (shared / "x").symlink_to(base / "real")
    with pytest.raises(OSError):
        resolve.open_path(str(shared / "x"))
    with pytest.raises(OSError) as err:
        resolve.open_path(str(base / "real" / "missing"))
    assert err.value.errno == errno.ENOENT


def parent_home(base: Path) -> Path:  # noqa: F811
    """A parent agent's home holding its child's code: the parent (another uid) may swap
    anything in it."""
    home = base / "parent"
    (home / "sub").mkdir(parents=True)
    for path in (home, home / "sub"):
        path.chmod(0o755)
    os.chown(home, uid_for(29), uid_for(29))
    return home


def swap(home: Path, target: str) -> None:
    """The attack: the code directory becomes a symlink (the child's restart would then be
    granted what the symlink names, as root resolves it)."""
    (home / "sub").rename(home / "sub.real")
    (home / "sub").symlink_to(target)


def pinned(tier: str, policy: Policy) -> Policy:
    fresh = SimpleNamespace(_pins={})  # what Sandboxes.pins keeps between spawns: nothing yet
    return replace(policy, pins=Sandboxes.pins(fresh, tier,  # type: ignore[arg-type]
                                               (policy.home or "", *policy.readable)))


def test_pins_are_reused_only_where_root_alone_could_change_them(base: Path) -> None:  # noqa: F811
    """The kernel walks the system's paths again only every PIN_TTL seconds, never a path
    in a directory another uid may write: a code directory swapped between two spawns is
    walked again and refused."""
    kept = SimpleNamespace(_pins={})
    home = parent_home(base)
    paths = ("/usr", str(home / "sub"))
    first = Sandboxes.pins(kept, "strict", paths)  # type: ignore[arg-type]
    assert resolve.pin_trusted("/usr") == (first["/usr"], True)
    assert resolve.pin_trusted(str(home / "sub"))[1] is False
    assert set(kept._pins) == {"/usr"}
    swap(home, "/")
    with pytest.raises(OSError) as err:
        Sandboxes.pins(kept, "strict", paths)  # type: ignore[arg-type]
    assert err.value.errno == errno.ELOOP


@needs_root
@pytest.mark.parametrize("tier", ["standard", "strict"])
def test_a_code_directory_swapped_for_a_symlink_is_not_granted(base: Path,  # noqa: F811
                                                               tier: str) -> None:
    """`sub` -> /proc/self/cwd after the kernel checked it: the launcher's cwd is `/`, so
    following it granted the agent read and execute on the whole host (standard tier)."""
    need_tier(tier)
    uid = uid_for(20 if tier == "standard" else 21)
    home = parent_home(base)
    policy = make_policy(tier, base, uid, readable=sandbox.default_readable(str(home / "sub")))
    # Without the kernel's pins: the launcher follows no symlink an agent could plant (in
    # strict, bubblewrap recreates it inside, where it leads to the agent's own home).
    swap(home, "/proc/self/cwd")
    run = run_agent(policy, [agent_python(tier, uid), "-c", LIST, "/"])
    assert "etc" not in run.stdout, run.stdout
    if tier == "standard":
        assert run.returncode == LaunchExit.POLICY and "symlink" in run.report.error, run.stderr
    # With them, as the kernel starts every agent: only the directory it checked is granted.
    (home / "sub").unlink()
    (home / "sub.real").rename(home / "sub")
    policy = pinned(tier, policy)
    swap(home, "/proc/self/cwd")
    run = run_agent(policy, [agent_python(tier, uid), "-c", LIST, "/"])
    assert run.returncode == LaunchExit.POLICY, run.stderr
    assert run.report.error.startswith("policy: ") and "etc" not in run.stdout


@needs_root
def test_a_bind_swapped_after_the_check_is_refused(base: Path) -> None:  # noqa: F811
    """Strict: bubblewrap resolves a bind's source itself, as root. Swapped for a symlink to
    `/` after the kernel built its command line, the code directory would show the agent the
    host's root; the inner launcher sees a directory that is not the one pinned, and refuses."""
    need_tier("strict")
    uid = uid_for(22)
    home = parent_home(base)
    policy = pinned("strict", make_policy(
        "strict", base, uid, readable=sandbox.default_readable(str(home / "sub"))))
    with Launch(policy, [agent_python("strict", uid), "-c", LIST, str(home / "sub")]) as start:
        swap(home, "/")
        proc = subprocess.Popen(start.argv, pass_fds=start.pass_fds, env={}, cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            report = start.report(timeout=15)
            out, err = proc.communicate(timeout=30)
        finally:
            cleanup(proc, uid)
    assert not report.ok and report.status == LaunchExit.POLICY, (report, err)
    assert "replaced" in report.error and proc.returncode == LaunchExit.POLICY
    assert b"etc" not in out


def test_pins_travel_in_the_policy() -> None:
    policy = Policy(tier="strict", uid=5, gid=5, home="/h", pins={"/h": [1, 2]})
    assert Policy.from_json(policy.to_json()) == policy
    for bad in ({"h": [1, 2]}, {"/h": [1]}, {"/h": [1, -2]}, {"/h": "1 2"}):
        with pytest.raises(ValueError):
            Policy.from_json(json.dumps({"tier": "none", "pins": bad}))
