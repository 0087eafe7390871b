"""The HTTP door hands syscalls to the kernel as structs: a chat over HTTP (whole and streamed)
makes no msgpack encode or decode inside the kernel process (arguments go to `execute` as the
struct the door built, results come back as objects), and its token is verified once, at the
door (the access check takes the capability the door verified). Real kernel, real HTTP; the
kernel's codec is counted (tests/codec_counting_kernel.py)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import KernelProcess, wait_until

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory,
            tiny_dir: Path) -> Iterator[tuple[KernelProcess, Path]]:
    tmp = tmp_path_factory.mktemp("nocodec")
    counts = tmp / "counts.json"
    k = KernelProcess(tmp / "state", env={"AGENTOS_CODEC_COUNTS": str(counts)})
    k.module = "tests.codec_counting_kernel"
    k.extra_args = ["--model", f"tiny={tiny_dir}", "--preload", "--http", "127.0.0.1:0"]
    k.start()
    yield k, counts
    assert k.stop() == 0


def _counts(k: KernelProcess, path: Path) -> dict[str, int]:
    """The kernel's codec calls since the last look (and zero them)."""
    path.unlink(missing_ok=True)
    k.send_signal(signal.SIGUSR1)
    assert wait_until(path.exists, timeout=10)
    return json.loads(path.read_text())


def test_an_http_chat_is_not_serialised_inside_the_kernel(
        counted: tuple[KernelProcess, Path]) -> None:
    k, path = counted
    minted = k.cli("token", "mint", "--for", "http:alice", "--cap=llm.*")
    assert minted.returncode == 0, minted.stderr
    url = f"http://{(k.state_dir / 'run' / 'http').read_text().strip()}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {minted.stdout.strip()}"}
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 8, "temperature": 0}
    warm = httpx.post(url, headers=auth, json=body, timeout=60)  # the model loaded, caches warm
    assert warm.status_code == 200, warm.text
    assert sum(_counts(k, path).values()) > 0  # the counter counts (the CLI's calls, at least)
    time.sleep(0.2)

    whole = httpx.post(url, headers=auth, json=body, timeout=60)
    streamed = httpx.post(url, headers=auth, json={**body, "stream": True}, timeout=60)
    denied = httpx.post(url, headers=auth, json={**body, "model": "nope"}, timeout=60)
    codec = _counts(k, path)

    assert whole.status_code == 200 and streamed.status_code == 200, (whole.text, streamed.text)
    text = whole.json()["choices"][0]["message"]["content"]
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == text
    assert denied.status_code == 404 and "nope" in denied.text  # an error crosses as a struct
    # Nothing encoded or decoded; the token verified once per request, at the door.
    assert codec == {"token.verify": 3}

