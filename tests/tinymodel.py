"""A tiny random Llama-style model and a byte-level BPE tokenizer, built in-process for tests."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320

# ChatML, the template SmolLM2 uses, so chat-formatted prompts look like the real model's.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the merges: English-ish words, digits and a few multi-byte characters, so
# decoding random ids meets both word pieces and split UTF-8 sequences.
CORPUS = [
    "the agent calls a tool and reads the answer before it plans the next step",
    "you are a helpful assistant; answer briefly and stop when you are done",
    "memory, storage, tools and access are managed by the kernel for every agent",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \"",
    "café naïve über straße — λ → ✓ 東京 😀",
] * 4


@functools.cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of VOCAB ids; `<|im_end|>` is EOS, `<|pad|>` pads."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>",
        pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)


def tiny_model(seed: int = 0, *, layers: int = 2, std: float = 0.5) -> LlamaForCausalLM:
    """A random 2-layer Llama (GQA: 4 query heads, 2 KV heads) over `tiny_tokenizer`'s vocabulary.

    The weights are drawn with a large `std` so that logits are far apart: batching and padding
    change the order of floating-point sums, and the top two logits must stay distinguishable
    through that noise for greedy outputs to be comparable token for token.
    """
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=std, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def tiny_embedder(directory: Path, seed: int = 0) -> Path:
    """A random BERT shaped like all-minilm-l6-v2 where the embedder is read from (hidden size
    384, the same files and manifest a pull leaves in `.embedders/all-minilm-l6-v2/`) but one
    layer deep, with a WordPiece vocabulary of the corpus's words and letters: about 2 MB."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from sdk import models as cache

    target = cache.embedder_dir(directory)
    target.mkdir(parents=True)
    words = sorted({w for line in CORPUS for w in re.findall(r"\w+", line.lower())})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
             *(f"##{c}" for c in letters), *(w for w in words if w not in letters)]
    (target / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(target / "vocab.txt"), do_lower_case=True).save_pretrained(
        target)
    config = BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(target)
    files = {p.name: cache.sha256(p) for p in target.iterdir()}
    (target / cache.EMBEDDER_MANIFEST).write_text(json.dumps(
        {"name": cache.EMBEDDER, "wheel": "tests", "version": "0", "files": files}))
    return target
