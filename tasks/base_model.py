"""Resolve the base model: a hub id or local folder as given, or build the tiny demo model locally.

``builtin:tiny-llama`` is a ~5 M parameter Llama-architecture model made with ``from_config``
and a BPE tokenizer trained with ``tokenizers`` on the bundled corpus, with a ChatML chat
template. It lets the demo and the tests run the real loading code with no hub access.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from data_contracts.config import ConfigError
from tasks.chat_templates import CHATML_TEMPLATE

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-llama"
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample_data"

# Weight files in Python's pickle format: loading one can run any code its author put in it.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def _corpus_texts() -> Iterator[str]:
    """Text for the tokenizer: every string in the bundled sample data, plus a small fallback."""
    for path in sorted(SAMPLE_DIR.glob("*")):
        if path.suffix not in (".jsonl", ".csv", ".txt"):
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            yield line
    yield from (
        "Hello, how can I help you today? Thanks for reaching out to support.",
        "Please reset your password from the account settings page.",
        "The order has shipped and should arrive within three business days.",
    )


def build_tiny_model(out_dir: str | Path, texts: Iterable[str] | None = None,
                     vocab_size: int = 4096, hidden: int = 256, layers: int = 4,
                     seed: int = 0) -> Path:
    """Train a BPE tokenizer and save a randomly initialised tiny Llama with safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else _corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(tmp)

    torch.manual_seed(seed)
    # Every Linear's output size is a multiple of 32: bitsandbytes' CPU 4-bit kernels need it.
    config = LlamaConfig(
        vocab_size=-(-len(fast) // 64) * 64, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "ftflow_builtin.json").write_text(json.dumps({"name": TINY_NAME, "seed": seed}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("built tiny base model at %s (%d parameters)", out, model.num_parameters())
    return out


def resolve_base_model(name: str, home: str | Path) -> str:
    """A path or hub id that ``from_pretrained`` accepts; builds builtin models on first use."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    builtin = name[len(BUILTIN_PREFIX):]
    if builtin != TINY_NAME:
        raise ValueError(f"unknown builtin model '{name}' (known: {BUILTIN_PREFIX}{TINY_NAME})")
    path = Path(home) / "models" / TINY_NAME
    if not (path / "model.safetensors").exists():
        from tasks.locks import file_lock

        # Two runs on a new home would both build it into the same ".building" folder.
        with file_lock(path.with_name(TINY_NAME + ".lock"), "another run is building " + name):
            if not (path / "model.safetensors").exists():
                build_tiny_model(path)
    return str(path)


def check_safetensors(path: str, allow_pickle: bool, key: str = "train.base_model") -> None:
    """Refuse a local model folder whose weights are only pickle files, unless allowed.

    A hub id is not looked at here: the loaders pass ``use_safetensors=True`` (see
    ``safetensors_only``), so transformers itself refuses pickle weights from the hub.
    """
    folder = Path(path)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)
                     if p.name != "training_args.bin")
    if pickles:
        raise ConfigError(
            f"{key}: {folder} holds only pickle weights ({', '.join(pickles)}), and ftflow loads "
            "safetensors only: loading a pickle file can run code. Convert the model to "
            "safetensors, or set train.allow_pickle=true if you trust where it came from")


def safetensors_only(allow_pickle: bool) -> dict[str, bool]:
    """The from_pretrained keyword that refuses pickle weights (none when they are allowed)."""
    return {} if allow_pickle else {"use_safetensors": True}
