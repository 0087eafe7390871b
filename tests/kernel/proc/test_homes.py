"""Agent homes with a quota (kernel/proc/homes.py): the mechanism itself, as root."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.proc import homes, sandbox
from tests.conftest import wait_until

REASON = homes.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"home quotas: {REASON}")
UID = 3_900_000 + os.getpid() % 10_000


@pytest.fixture
def home() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="agentos-homes-"))
    path = base / "agents" / "7" / "home"
    path.parent.mkdir(parents=True)
    sandbox.prepare_home(path, UID, UID)
    yield path
    homes.remove(path)
    shutil.rmtree(base)


def fill(path: Path, mib: int) -> int:
    """Write `mib` 1 MiB files as root (no reserved blocks: root gets what the agent would)."""
    written = 0
    try:
        for i in range(mib):
            (path / f"f{i}").write_bytes(b"x" * (1 << 20))
            written += 1
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    return written


def test_a_home_is_a_filesystem_of_its_quota(home: Path) -> None:
    homes.mount(home, 16 << 20, UID, UID)
    assert homes.is_mounted(home)
    st = home.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, UID, 0o700)
    assert os.listdir(home) == ["lost+found"]  # ext4's own, root's
    used, total = homes.usage(home)
    assert 12 << 20 < total <= 16 << 20 and used < 1 << 20
    assert 12 <= fill(home, 64) < 16
    image = home.parent / homes.IMAGE
    assert image.stat().st_size == 16 << 20
    assert stat.S_IMODE(image.stat().st_mode) == 0o600 and image.stat().st_uid == 0


def test_lock_down_closes_a_home_left_open_and_a_restart_reopens_it(home: Path) -> None:
    homes.mount(home, 8 << 20, UID, UID)
    (home / "kept").write_text("data")
    home.chmod(0o777)
    homes.lock_down(home)
    assert not homes.is_mounted(home)
    st = home.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    homes.mount(home, 8 << 20, UID, UID)  # the restart: same files, the agent's again, 0700
    st = home.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o700)
    assert (home / "kept").read_text() == "data"


def test_a_new_quota_resizes_the_home_or_refuses_with_edquot(home: Path) -> None:
    homes.mount(home, 8 << 20, UID, UID)
    assert fill(home, 5) == 5
    homes.unmount(home)
    homes.mount(home, 32 << 20, UID, UID)
    assert homes.usage(home)[1] > 24 << 20 and len(os.listdir(home)) == 6
    homes.unmount(home)
    with pytest.raises(homes.HomeError) as info:
        homes.mount(home, 4 << 20, UID, UID)  # 5 MiB of files do not fit in 4
    assert info.value.errno == errno.EDQUOT
    assert not homes.is_mounted(home)
    homes.mount(home, 32 << 20, UID, UID)
    assert len(os.listdir(home)) == 6  # nothing was lost by the refusal


def test_remove_and_stale_mounts(home: Path) -> None:
    homes.mount(home, 8 << 20, UID, UID)
    (home / "sub").mkdir()
    (home / "sub" / "link").symlink_to("/etc")  # rmtree must not follow it
    # A kernel that died left it mounted; the next one detaches it at boot.
    assert homes.detach_stale(home.parent.parent) == [str(home)]
    assert not homes.is_mounted(home)
    homes.mount(home, 8 << 20, UID, UID)
    homes.remove(home)
    assert not home.exists() and not (home.parent / homes.IMAGE).exists()
    assert os.path.exists("/etc/passwd")


def test_a_planted_image_is_refused(home: Path) -> None:
    (home.parent / homes.IMAGE).symlink_to("/etc/passwd")
    with pytest.raises(homes.HomeError):
        homes.mount(home, 8 << 20, UID, UID)
    assert not homes.is_mounted(home)
    out = subprocess.run(["losetup", "-j", "/etc/passwd"], capture_output=True, text=True)
    assert out.stdout == ""
    (home.parent / homes.IMAGE).unlink()


def test_mount_attaches_the_loop_device_itself_and_it_detaches_with_the_mount(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No `mount` process on the spawn's path: LOOP_CONFIGURE and mount(2) directly."""
    ran = []
    real_run = homes._run
    monkeypatch.setattr(homes, "_run", lambda *argv, **kw: (ran.append(argv[0]),
                                                            real_run(*argv, **kw)))
    homes.mount(home, 8 << 20, UID, UID)
    assert homes.is_mounted(home) and ran == ["mkfs.ext4"]
    image = home.parent / homes.IMAGE
    attached = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    assert str(image) in attached.stdout
    with open("/proc/self/mountinfo") as f:
        line = next(line for line in f if line.split()[4] == str(home))
    assert "nosuid" in line and "nodev" in line and " ext4 " in line
    homes.lock_down(home)
    detached = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    assert detached.stdout == ""  # autoclear: nothing left attached


def test_mount_falls_back_to_the_mount_tool(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loop_configure(image: Path, where: Path) -> None:
        raise OSError(errno.EINVAL, "LOOP_CONFIGURE: no such ioctl (Linux < 5.8)")

    monkeypatch.setattr(homes, "_mount_loop", no_loop_configure)
    homes.mount(home, 8 << 20, UID, UID)
    assert homes.is_mounted(home) and os.listdir(home) == ["lost+found"]


def test_spares_are_formatted_ahead_and_taken_by_rename(home: Path) -> None:
    spares_dir = home.parent.parent / "spares"
    spares_dir.mkdir(mode=0o700)
    (spares_dir / "dead.tmp").write_bytes(b"half made")  # a dead kernel's
    (spares_dir / "old.img").write_bytes(b"x" * 4096)  # another size
    (spares_dir / "dead.mnt").write_bytes(b"x" * (8 << 20))  # one it had mounted ahead
    spares = homes.Spares(spares_dir, 8 << 20, count=2, mounted=0)
    try:
        assert wait_until(lambda: len(spares.ready()) == 2, timeout=30)
        assert sorted(os.listdir(spares_dir)) == spares.ready()  # the leftovers are gone
        assert spares.take(16 << 20, home.parent / "other.img") is None  # not its size
        homes.mount(home, 8 << 20, UID, UID, spares)
        assert spares.taken == 1 and homes.is_mounted(home)
        st = home.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, UID, 0o700)
        assert os.listdir(home) == ["lost+found"]
        assert 4 <= fill(home, 16) < 8
        assert wait_until(lambda: len(spares.ready()) == 2 and spares.made == 3, timeout=30)
    finally:
        spares.close()


def loops() -> dict[str, str]:
    """Each attached loop device's image (its path as it is now) -> the device."""
    found = {}
    for name in os.listdir("/sys/block"):
        try:
            found[Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()] = \
                f"/dev/{name}"
        except OSError:
            continue
    return found


def test_homes_mounted_ahead_are_moved_into_place_and_freed_with_the_spares(home: Path) -> None:
    """A spare mounted ahead is on no path until a spawn takes it: then it is the home's
    filesystem, with the quota, flags and owner a home mounted at the spawn gets; closing the
    spares unmounts the others, and their loop devices detach."""
    spares_dir = home.parent.parent / "spares"
    spares_dir.mkdir(mode=0o700)
    spares = homes.Spares(spares_dir, 8 << 20, count=1, mounted=2)
    try:
        if not wait_until(lambda: len(spares._mounted) == 2, timeout=30):
            pytest.skip("no fsopen/fsmount here: homes are not mounted ahead")
        ahead = {str(path) for path, _ in spares._mounted}
        devices = [loops()[path] for path in ahead]  # KeyError: not attached
        with open("/proc/self/mountinfo") as f:
            table = f.read()
        assert not [d for d in devices if f" {d} " in table]  # detached: on no path
        homes.mount(home, 8 << 20, UID, UID, spares)
        assert spares.taken == 1 and homes.is_mounted(home)
        image = str(home.parent / homes.IMAGE)
        assert loops()[image] in devices  # one of those mounted ahead, moved into place
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if line.split()[4] == str(home))
        assert "nosuid" in line and "nodev" in line and " ext4 " in line
        st = home.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, UID, 0o700)
        assert os.listdir(home) == ["lost+found"]
        assert 4 <= fill(home, 16) < 8
    finally:
        left = {str(path) for path, _ in spares._mounted}
        spares.close()
    assert left and wait_until(lambda: not left & set(loops()), timeout=10)
    assert not {str(p) for p in spares_dir.iterdir()} & set(loops())
