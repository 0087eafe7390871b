"""dtype `auto`, the default: bfloat16 where the CPU computes it natively, float32 elsewhere,
resolved once when a model loads, and what a loaded model runs in as `llm.models`, `agentos
model list` and `agentos top` show it."""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.config import Config, ModelConfig
from kernel.llm import store
from tests.conftest import KernelProcess


def _expected() -> str:
    """What `auto` must give on this machine, by the real probe."""
    return "bfloat16" if store.cpu_runs_bf16() else "float32"


def test_auto_is_the_default_and_a_bad_dtype_is_refused_at_boot() -> None:
    assert ModelConfig("m").dtype == "auto"
    assert Config().models["smollm2"].dtype == "auto"
    assert ModelConfig.parse("m", {"dtype": "bfloat16"}).dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"\[models.m\]: bad dtype 'fp8'"):
        ModelConfig.parse("m", {"dtype": "fp8"})


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="reads /proc/cpuinfo's x86 flags")
def test_the_probe_reads_the_cpus_bf16_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's cpuinfo and /proc/cpuinfo agree, and the probe falls back to the second where
    torch has no `get_capabilities`."""
    import torch

    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    native = (torch.backends.cpu.get_cpu_capability() == "AVX512"
              and bool(flags & {"avx512_bf16", "amx_bf16"}))
    assert store.cpu_runs_bf16() is native and store._probe_bf16() is native
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert store._probe_bf16() is native  # the uncached probe, through /proc/cpuinfo


@pytest.mark.parametrize("native", [True, False], ids=["cpu-with-bf16", "cpu-without-bf16"])
def test_auto_loads_bf16_only_where_the_cpu_runs_it(
        native: bool, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Only the probe is forced; the load, the engine and a generation are real."""
    import torch

    from kernel.llm.backends import LocalBackend
    from kernel.llm.engine import SamplingParams

    monkeypatch.setattr(store, "cpu_runs_bf16", lambda: native)
    want = "bfloat16" if native else "float32"
    with caplog.at_level(logging.INFO, logger="kernel.llm"):
        backend = LocalBackend(ModelConfig("tiny", source=str(tiny_dir), device="cpu"))
    assert backend.dtype == want
    assert backend.model.dtype == backend.engine.slots.dtype == getattr(torch, want)
    (loaded,) = [r for r in caplog.records if r.getMessage() == "model loaded"]
    assert (loaded.dtype, loaded.dtype_asked) == (want, "auto")  # type: ignore[attr-defined]
    ids = backend.tokenizer("the agent calls a tool")["input_ids"]
    backend.engine.add(1, ids, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    made = []
    while not (out := backend.engine.step([1])[1]).finished:
        made += out.new_tokens
    assert len(made + out.new_tokens) == 4


def test_an_explicit_dtype_is_kept_whatever_the_cpu(tiny_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel.llm.backends import load_model

    monkeypatch.setattr(store, "cpu_runs_bf16", lambda: True)
    assert load_model(ModelConfig("tiny", source=str(tiny_dir), dtype="float32"))[3] == "float32"
    monkeypatch.setattr(store, "cpu_runs_bf16", lambda: False)
    assert load_model(ModelConfig("tiny", source=str(tiny_dir),
                                  dtype="bfloat16"))[3] == "bfloat16"


# --- what the kernel says a loaded model runs in --------------------------------------------


@pytest.fixture(scope="module")
def auto_kernel(tmp_path_factory: pytest.TempPathFactory,
                tiny_dir: Path) -> Iterator[tuple[KernelProcess, Path]]:
    """A kernel serving `tiny` from a model store of its own, in the default dtype (`auto`),
    and a second name for it pinned to float32 in the config file."""
    root = tmp_path_factory.mktemp("dtype")
    models = root / "models"
    store.ModelStore(models).pull("tiny", source=tiny_dir, progress=False)
    config = root / "kernel.toml"
    config.write_text('[models.tiny]\ndefault = true\n\n'
                      '[models.exact]\nsource = "tiny"\ndtype = "float32"\n')
    k = KernelProcess(root / "state", {"AGENTOS_MODEL_DIR": str(models)})
    k.dtype = None  # no --dtype flag (it would override every model's): the config's hold
    k.extra_args = ["--config", str(config), "--preload"]
    k.start()
    try:
        yield k, models
    finally:
        k.stop()


def test_llm_models_says_what_each_loaded_model_runs_in(
        auto_kernel: tuple[KernelProcess, Path]) -> None:
    from tests.conftest import wait_until

    k, _ = auto_kernel
    with k.connect() as conn:
        assert wait_until(lambda: all(m.running_dtype for m in conn.llm.models()), timeout=60)
        infos = {m.name: m for m in conn.llm.models()}
    assert (infos["tiny"].dtype, infos["tiny"].running_dtype) == ("auto", _expected())
    assert (infos["exact"].dtype, infos["exact"].running_dtype) == ("float32", "float32")
    assert infos["tiny"].stored == infos["exact"].stored == "tiny"
    assert f"model loaded model=tiny device=cpu dtype={_expected()} dtype_asked=auto" in k.log()


def test_model_list_and_top_show_the_running_dtype(auto_kernel: tuple[KernelProcess, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import wait_until

    k, models = auto_kernel
    monkeypatch.setenv("AGENTOS_MODEL_DIR", str(models))
    with k.connect() as conn:
        assert wait_until(lambda: all(m.running_dtype for m in conn.llm.models()), timeout=60)
    listed = k.cli("model", "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "PARAMS", "STORED", "RUNS"]
    name, _, stored, runs = row.split()[:4]
    assert (name, stored, runs) == ("tiny", "float32", f"{_expected()},exact=float32")
    (entry,) = json.loads(k.cli("model", "list", "--json").stdout)
    assert entry["served"] == [
        {"name": "tiny", "device": "cpu", "running_dtype": _expected()},
        {"name": "exact", "device": "cpu", "running_dtype": "float32"}]

    top = k.cli("top", "--once", "--interval", "0.1")
    assert top.returncode == 0, top.stderr
    cells = [[c.strip() for c in line.strip("│").split("│")]
             for line in top.stdout.splitlines() if line.startswith("│")]
    dtypes = {row[0]: row[1] for row in cells}  # the LLM table's MODEL and DTYPE
    assert (dtypes["tiny"], dtypes["exact"]) == (_expected(), "float32")


def test_model_list_without_a_kernel_runs_nothing(auto_kernel: tuple[KernelProcess, Path],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, models = auto_kernel
    monkeypatch.setenv("AGENTOS_MODEL_DIR", str(models))
    alone = KernelProcess(tmp_path / "none")  # never started: no kernel on that state dir
    listed = alone.cli("model", "list")
    assert listed.returncode == 0, listed.stderr
    name, _, stored, runs = listed.stdout.splitlines()[1].split()[:4]
    assert (name, stored, runs) == ("tiny", "float32", "-")


def test_models_loading_at_once_each_get_their_own_dtype(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers loads a model under `torch.set_default_dtype(dtype)`, which is one setting
    for the whole process: two models loading on two worker threads at once (a bfloat16 one
    and a float32 one, as the kernel's preload does) made the float32 model's weights
    bfloat16 (seen in CI). Loads are one at a time, and the global default stays float32.
    Each switch of the default is slowed a little so that the threads interleave every run."""
    import threading
    import time

    import torch

    from kernel.llm.backends import load_model

    switch = torch.set_default_dtype

    def slow_switch(dtype: torch.dtype) -> None:
        switch(dtype)
        time.sleep(0.01)

    monkeypatch.setattr(torch, "set_default_dtype", slow_switch)

    got: dict[str, list[str]] = {"bfloat16": [], "float32": []}
    start = threading.Barrier(2)

    def load(dtype: str) -> None:
        config = ModelConfig("tiny", source=str(tiny_dir), dtype=dtype)
        start.wait()
        for _ in range(5):
            got[dtype].append(load_model(config)[3])

    threads = [threading.Thread(target=load, args=(d,)) for d in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {d: [d] * 5 for d in got}
    assert torch.get_default_dtype() == torch.float32


def test_sampling_does_not_depend_on_the_processs_default_dtype() -> None:
    """A model loading on another thread changes torch's default dtype for a moment; a sampled
    token drawn meanwhile must be the one drawn at any other time."""
    import torch

    from kernel.llm.engine import SamplingParams
    from kernel.llm.engine.sampling import make_generator, sample

    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7)

    def draws() -> list[int]:
        gen = make_generator(params, logits.device)
        return [sample(logits, [params], [gen])[0] for _ in range(300)]

    plain = draws()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert draws() == plain
    finally:
        torch.set_default_dtype(torch.float32)
