"""Fixtures: real kernels in temporary state dirs, the CLI as a subprocess, test agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import sdk

ROOT = Path(__file__).resolve().parent.parent
# Property tests run `n * DEEP` examples: the suite stays fast on every commit, and a deep
# run (AGENTOS_TEST_DEEP=10 make test) multiplies each search; Hypothesis draws new examples
# every run, so runs add up.
DEEP = max(1, int(os.environ.get("AGENTOS_TEST_DEEP", "1")))
TESTS = Path(__file__).resolve().parent  # shared fixtures: agents/, hostile/, mcp_*.py
AGENTS = TESTS / "agents"


def _best_tier() -> str:
    """The strongest sandbox tier this machine applies (AGENTOS_TEST_SANDBOX overrides): test
    kernels boot with it as their default, so the suite runs agents the way production does."""
    from kernel.proc import sandbox

    if os.environ.get("AGENTOS_TEST_SANDBOX"):
        return os.environ["AGENTOS_TEST_SANDBOX"]
    probe = sandbox.probe()
    for tier in ("strict", "standard"):
        try:
            sandbox.plan(tier, probe)
            return tier
        except sandbox.SandboxUnavailable:
            pass
    return "none"


TEST_TIER = _best_tier()


class KernelProcess:
    """A kernel booted with `python -m kernel` in its own state dir."""

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []
        self.module = "kernel"  # what `python -m` runs: a test may wrap the kernel's main
        self.prefix: list[str] = []  # a command the kernel runs under (setpriv, as systemd would)
        # Its models compute in float32 whatever the CPU (the kernel's default, `auto`, is
        # bfloat16 on one with AVX512-BF16): greedy outputs compared with float32 references,
        # or across batch compositions, are the same on every machine. None: no --dtype flag,
        # the config's and the kernel's default hold (the tests of `auto`).
        self.dtype: str | None = "float32"

    def start(self, wait: bool = True) -> KernelProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the kernel
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", self.module, "--state-dir", str(self.state_dir),
             "--log-format", "text", "--sandbox", TEST_TIER,
             *(["--dtype", self.dtype] if self.dtype else []), *self.extra_args],
            stdout=self._log, stderr=self._log, env=self.env, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernel exited {self.proc.returncode}:\n{self.log()}")
            try:
                with self.connect(timeout=1.0) as conn:
                    conn.sys.null()
                return
            except sdk.SyscallError:
                time.sleep(0.05)
        raise RuntimeError(f"kernel not ready:\n{self.log()}")

    def connect(self, timeout: float = 10.0) -> sdk.Connection:
        return sdk.connect(state_dir=self.state_dir, timeout=timeout)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "userland.cli", "--state-dir",
                               str(self.state_dir), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def unmount_homes(self) -> None:
        """Homes a killed kernel left mounted (the next kernel there would unmount them)."""
        if os.geteuid() == 0 and (self.state_dir / "agents").is_dir():
            from kernel.proc import homes

            homes.detach_stale(self.state_dir / "agents")


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    """One kernel shared by the tests that do not stop or crash it."""
    k = KernelProcess(tmp_path_factory.mktemp("k") / "state").start()
    yield k
    k.stop()


@pytest.fixture
def fresh_kernel(tmp_path: Path) -> Iterator[KernelProcess]:
    """A kernel of the test's own, for tests that signal, crash or restart it."""
    k = KernelProcess(tmp_path / "state")
    yield k
    if k.proc is not None and k.proc.poll() is None:
        k.stop(signal.SIGKILL)
    k.unmount_homes()


@pytest.fixture
def admin(kernel: KernelProcess) -> Iterator[sdk.Connection]:
    with kernel.connect() as conn:
        yield conn


def agent(name: str) -> str:
    return str(AGENTS / f"{name}.py")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model and tokenizer saved for `--model tiny=PATH` (a few MB); one for the
    whole run: tests read it, and copy it to change it."""
    from tests.tinymodel import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model(seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def require_smollm2() -> None:
    """Skip the calling test unless the real model is cached."""
    from sdk.models import ModelNotFound, ModelStore

    try:
        ModelStore().path("smollm2")
    except ModelNotFound:
        pytest.skip("smollm2 is not cached (agentos model pull smollm2)")


@pytest.fixture(scope="session")
def smollm2_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    """One kernel serving the real model (the default, preloaded) with an HTTP door, shared by
    the integration tests: SmolLM2 takes seconds to load, so a run loads it once. Skips the
    test unless the model is cached."""
    require_smollm2()
    k = KernelProcess(tmp_path_factory.mktemp("smollm2") / "state")
    k.extra_args = ["--preload", "--http", "127.0.0.1:0"]
    k.start()
    yield k
    assert k.stop() == 0


def run_calls(k: KernelProcess, name: str, calls: list, caps: tuple[str, ...] = ()) -> list:
    """Spawn tests/agents/calls.py to make `calls` ([name, args] pairs) with `caps`; its
    outcomes."""
    with k.connect() as admin:
        agent_id = admin.proc.spawn(agent("calls"), name=name, argv=[json.dumps(calls)],
                                    caps=list(caps))
        info = admin.proc.wait(agent_id, timeout=60)
        assert info.exit_status == 0, admin.proc.logs(agent_id, "stderr").data.decode()
        return info.result


def process_memory(pid: int) -> bytes:
    """Every writable mapping of `pid`, read as root."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if perms.startswith("rw"):
                start, end = (int(x, 16) for x in addr.split("-"))
                try:
                    mem.seek(start)
                    chunks.append(mem.read(end - start))
                except (OSError, OverflowError, ValueError):
                    continue
    return b"".join(chunks)


def agent_token(pid: int) -> str:
    """A running agent's token, as an attacker who got hold of it would have it: from its
    exec'd environment, or (an agent forked from the zygote, whose /proc/PID/environ is the
    template's empty one) from the environment strings in its memory."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        found = [e for e in f.read().split(b"\0") if e.startswith(b"AGENTOS_TOKEN=")]
    if not found:
        memory = process_memory(pid)
        start = memory.index(b"AGENTOS_TOKEN=")
        found = [memory[start:memory.index(b"\0", start)]]
    return found[0].split(b"=", 1)[1].decode()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    """Print the seed of the random test order (pytest-randomly) even under -q, for replay."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: --randomly-seed={seed} replays it")


@pytest.fixture(autouse=True)
def _umask_per_test() -> Iterator[None]:
    """Each test starts with the umask the run started with: a kernel booted in this process
    (`StateDir.open` sets 077, as the kernel's process must) would otherwise leave it for every
    later test, whose files (an agent's code, a model) its agents' uids then cannot read."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)
