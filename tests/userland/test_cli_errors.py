"""Errors say what to do, and what they say works when followed: each hint here is run as
written and must then succeed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import ROOT, KernelProcess


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[KernelProcess]:
    k = KernelProcess(tmp_path_factory.mktemp("err") / "state")
    k.extra_args = ["--model", f"tiny={tiny_dir}", "--http", "127.0.0.1:0"]
    k.start()
    yield k
    k.stop()


def _url(k: KernelProcess, path: str) -> str:
    return f"http://{(k.state_dir / 'run' / 'http').read_text().strip()}{path}"


def _hint(message: str) -> list[str]:
    """The command a message names in backquotes, as argv (NAME filled in)."""
    commands = re.findall(r"`(agentos [^`]+)`", message)
    assert commands, message
    return shlex.split(commands[0].replace("NAME", "newcomer"))[1:]


def test_the_http_doors_hints_mint_keys_that_work(web: KernelProcess) -> None:
    models = _url(web, "/v1/models")
    bare = httpx.get(models)
    assert bare.status_code == 401
    followed = web.cli(*_hint(bare.json()["error"]["message"]))
    assert followed.returncode == 0, followed.stderr
    key = followed.stdout.strip()
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(models, headers=auth).status_code == 200
    chat = httpx.post(_url(web, "/v1/chat/completions"), headers=auth, timeout=60,
                      json={"model": "tiny", "max_tokens": 4,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    with web.connect() as conn:
        (token,) = conn.caps.list(subject="http:newcomer")
        assert token.expires_at is not None  # an API key with an end

    # The admin's own token is not an HTTP key: the 401 names the command that makes one.
    admin = web.cli("token", "mint").stdout.strip()
    wrong = httpx.get(models, headers={"Authorization": f"Bearer {admin}"})
    assert wrong.status_code == 401 and "agentos token http NAME" in wrong.text

    # /metrics needs sys.stats; the 403 says which right and how to get a key with it.
    metrics = httpx.get(_url(web, "/metrics"), headers=auth)
    assert metrics.status_code == 403
    followed = web.cli(*_hint(metrics.json()["error"]["message"]))
    assert followed.returncode == 0, followed.stderr
    again = httpx.get(_url(web, "/metrics"),
                      headers={"Authorization": f"Bearer {followed.stdout.strip()}"})
    assert again.status_code == 200 and "agentos_" in again.text


def test_token_mint_help_names_http_principals(web: KernelProcess) -> None:
    helped = web.cli("token", "mint", "--help")
    assert "http:NAME" in helped.stdout
    assert "llm.models" in web.cli("token", "http", "--help").stdout


def test_caps_revoke_takes_the_short_id_caps_list_shows(web: KernelProcess) -> None:
    assert web.cli("token", "http", "short").returncode == 0
    with web.connect() as conn:
        (token,) = conn.caps.list(subject="http:short")
    full = token.id
    out = web.cli("caps", "revoke", full[:8])
    assert out.returncode == 0 and "revoked 1" in out.stdout, out.stderr
    bad = web.cli("caps", "revoke", "zz(")
    assert bad.returncode == 1 and bad.stderr.startswith("agentos: EINVAL: ")
    none = web.cli("caps", "revoke", "0000000")
    assert none.returncode == 1 and none.stderr.startswith("agentos: E")


def test_no_kernel_is_enoent_with_the_command_to_start_one(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "userland.cli", "--state-dir", str(tmp_path),
                          "ps"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("agentos: ENOENT: ") and "agentos boot --daemon" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_reach_names_the_directory_behind_a_symlink(tmp_path: Path) -> None:
    """A venv's python is a symlink into a 0700 directory (a pyenv under /root): the check
    follows it and names that directory, with the fix."""
    from kernel.proc.launch import reach

    base = Path(os.environ.get("AGENTOS_TEST_DIR", ROOT)) / f".reach-{os.getpid()}"
    closed, venv = base / "closed", base / "venv" / "bin"
    try:
        closed.mkdir(parents=True)
        venv.mkdir(parents=True)
        for d in (base, base / "venv", venv):
            d.chmod(0o755)
        closed.chmod(0o700)
        (closed / "python3").write_bytes(b"")
        (closed / "python3").chmod(0o755)
        (venv / "python").symlink_to(closed / "python3")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become nobody and ask
            os.close(read)
            try:
                os.setgid(65534)
                os.setuid(65534)
                reach(str(venv / "python"), os.X_OK, "python")
                os.write(write, b"reachable")
            except PermissionError as exc:
                os.write(write, str(exc).encode())
            finally:
                os._exit(0)
        os.close(write)
        message = os.read(read, 4096).decode()
        os.waitpid(pid, 0)
    finally:
        subprocess.run(["rm", "-rf", str(base)])
    assert f"no search permission on {closed}" in message, message
    assert f"chmod o+x {closed}" in message and "real path" in message
