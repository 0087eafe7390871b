"""Agents bring their own dependencies (issue 18.3): `agentos run` builds a virtual environment
from the requirements beside the agent (once; cached by their hash), the kernel runs the agent
with its interpreter, bound read-only: the agent imports its package and cannot write a byte
of its environment. A broken requirements file starts nothing; the kernel refuses an
environment others could change. Offline: the package is a wheel made here, installed with
--no-index --find-links (pip's or uv's, whichever builds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sdk
from tests.conftest import ROOT, TEST_TIER, TESTS, KernelProcess
from tests.wheels import make_wheel
from userland import venvs

pytestmark = pytest.mark.skipif(
    TEST_TIER != "strict", reason="agent code under pytest's 0700 tmp dir is reachable only "
    "through the strict tier's own mount tree")

AGENT = '''
import os, sys, tinydep
from sdk import Agent, SyscallError


class VenvAgent(Agent):
    def run(self, task):
        site = os.path.dirname(os.path.dirname(tinydep.__file__))
        tries = {}
        for name, attempt in (
                ("new file", lambda: open(os.path.join(site, "planted.pth"), "w")),
                ("module", lambda: open(tinydep.__file__, "a")),
                ("mkdir", lambda: os.mkdir(os.path.join(sys.prefix, "bin", "x"))),
                ("python", lambda: open(os.path.join(sys.prefix, "bin", "python"), "a"))):
            try:
                attempt().close()
                tries[name] = "written"
            except OSError as exc:
                tries[name] = type(exc).__name__
        child = None
        if task == "spawn":
            try:
                self.proc.spawn(__file__, name="child", venv="/usr")
            except SyscallError as exc:
                child = exc.code.name
        return {"answer": tinydep.ANSWER, "prefix": sys.prefix, "tries": tries,
                "child": child, "virtual_env": os.environ.get("VIRTUAL_ENV")}
'''


@pytest.fixture(scope="session")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment the CLI builds with: the venv cache and pip pointed at a local wheel
    (kept for the session, so only the first build is cold)."""
    base = tmp_path_factory.mktemp("venvs")
    make_wheel(base / "wheels")
    return {**os.environ, venvs.ENV_DIR: str(base / "cache"), "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(base / "wheels"), "UV_NO_INDEX": "1",
            "UV_FIND_LINKS": str(base / "wheels")}


def agent_dir(parent: Path, requirements: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "requirements.txt").write_text(requirements)
    (parent / "agent.py").write_text(AGENT)
    return parent / "agent.py"


def cli(k: KernelProcess, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userland.cli", "--state-dir",
                           str(k.state_dir), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def test_the_agent_imports_its_package_and_cannot_write_its_venv(
        kernel: KernelProcess, offline: dict[str, str], tmp_path: Path) -> None:
    code = agent_dir(tmp_path / "bringer", "tinydep==1.0\n")
    run = cli(kernel, offline, "run", "--wait", "--cap", "proc.spawn", str(code), "--", "spawn")
    assert run.returncode == 0, run.stderr
    assert "agentos: venv" in run.stderr  # the build's progress (or that it was built before)
    result = json.loads(run.stdout)
    assert result["answer"] == 42
    assert result["prefix"].startswith(offline[venvs.ENV_DIR])
    assert result["virtual_env"] == result["prefix"]
    assert "written" not in result["tries"].values(), result["tries"]
    assert result["child"] == "EPERM"  # a child only ever gets its parent's own venv
    with kernel.connect() as admin:
        shown = [a for a in admin.proc.ps() if a.venv == result["prefix"]]
    assert shown, "agentos ps/info name the agent's venv"


def test_a_broken_requirements_file_starts_nothing(
        kernel: KernelProcess, offline: dict[str, str], tmp_path: Path) -> None:
    code = agent_dir(tmp_path / "broken", "no-such-package-anywhere==9.9\n")
    with kernel.connect() as admin:
        before = len(admin.proc.ps())  # every agent, ended ones too
        run = cli(kernel, offline, "run", "--wait", str(code))
        assert run.returncode == 125, run.stderr
        assert "cannot build the agent's environment" in run.stderr
        assert "no-such-package-anywhere" in run.stderr
        assert len(admin.proc.ps()) == before
    # Nothing half built is left: only the good environment the other tests built.
    assert all((p / venvs.DONE).is_file() for p in Path(offline[venvs.ENV_DIR]).iterdir()
               if not p.name.startswith("."))


def test_a_built_venv_is_reused(offline: dict[str, str], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (venvs.ENV_DIR, "PIP_NO_INDEX", "PIP_FIND_LINKS", "UV_NO_INDEX", "UV_FIND_LINKS"):
        monkeypatch.setenv(name, offline[name])
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["tinydep==1.0"]\n')
    text, cwd = venvs.requirements_for(tmp_path / "agent.py")
    assert text == "tinydep==1.0\n" and cwd == tmp_path
    first = venvs.build(text, cwd)
    started = time.monotonic()
    log = tmp_path / "log"
    with open(log, "w") as f:
        assert venvs.build(text, cwd, log=f) == first
    assert time.monotonic() - started < 2.0 and "built before" in log.read_text()


def fake_venv(path: Path) -> Path:
    """A directory that looks like a venv (pyvenv.cfg, bin/python) without building one."""
    (path / "bin").mkdir(parents=True)
    (path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (path / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_the_kernel_refuses_a_venv_others_could_change(kernel: KernelProcess,
                                                       tmp_path: Path) -> None:
    code = TESTS / "agents" / "model_agent.py"
    writable = fake_venv(tmp_path / "writable")
    writable.chmod(0o777)
    inside = fake_venv(kernel.state_dir / "planted-venv")
    strangers = fake_venv(tmp_path / "strangers")
    os.chown(strangers, 4242, 4242)  # another local user's: they could change it any time
    plain = tmp_path / "plain"
    plain.mkdir()
    with kernel.connect() as admin:
        for venv, error, why in ((writable, sdk.PermissionDenied, "writable by others"),
                                 (inside, sdk.PermissionDenied, "state dir"),
                                 (strangers, sdk.PermissionDenied, "belongs to uid 4242"),
                                 (plain, sdk.NotFound, "not a virtual environment")):
            with pytest.raises(error, match=why):
                admin.proc.spawn(str(code), name="refused", argv=["[]"], venv=str(venv))


def test_an_environment_is_named_by_the_installation_it_links_to() -> None:
    """An environment links to the agentos installation that built it (its agentos-sdk.pth);
    one built from a checkout since moved or removed must not be found again by the same
    requirements: its name (the cache key) covers the installation's paths."""
    from userland import venvs

    here = venvs.key("tinydep==1.0\n", sys.executable, "3.11.7", venvs._sdk_dirs())
    assert here == venvs.key("tinydep==1.0\n", sys.executable, "3.11.7", venvs._sdk_dirs())
    assert here != venvs.key("tinydep==1.0\n", sys.executable, "3.11.7", ["/gone/site-packages"])
