"""Resolve the base model: a hub id or local folder as given, or build the tiny demo model locally.

``builtin:tiny-llama`` is a ~5 M parameter Llama-architecture model that knows some English: a
byte-level BPE tokenizer (GPT-2's pre-tokenizer) and the model are trained here, once, on prose
every Python installation has offline: the interpreter's own documentation (``pydoc_data``
topics) and the docstrings of its standard library. Part of that prose is held out of
pretraining; the evaluate stage measures it as a forgetting check (``general_heldout_texts``).
The result is cached in ``<home>/models/tiny-llama-<digest>``, keyed by a digest of the recipe
and of the corpus, so the demo and the tests run the real loading code with no hub access.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from data_contracts.config import ConfigError
from tasks.chat_templates import CHATML_TEMPLATE

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-llama"
BUILTIN_FILE = "ftflow_builtin.json"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Weight files in Python's pickle format: loading one can run any code its author put in it.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
# The pretraining recipe; its digest (with the corpus's) names the cached model. The step count
# can be lowered with FTFLOW_TINY_PRETRAIN_STEPS (the test suite does: a cheaper, still
# pretrained base, cached under another digest).
RECIPE: dict[str, Any] = {
    "version": 1, "vocab_size": 4096, "hidden": 256, "layers": 4, "heads": 4,
    "seq_len": 128, "batch_size": 8, "steps": 160, "lr": 3e-3, "warmup_steps": 20,
    "weight_decay": 0.1, "seed": 0, "heldout_every": 20,
}
STEPS_ENV = "FTFLOW_TINY_PRETRAIN_STEPS"
PARAGRAPH_CHARS = (200, 800)  # general-set passages: long enough to score, short for windows


def _stdlib_docstrings() -> Iterator[tuple[str, str]]:
    """(module name, its docstrings) for the top-level modules of the standard library: English
    prose that ships with every interpreter. Parsed with ``ast``, never imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(node, clean=True)
                for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d and len(d) >= 40)
        if text:
            yield f"stdlib:{path.stem}", text


@functools.lru_cache(maxsize=1)
def corpus_documents() -> list[tuple[str, str]]:
    """(name, text) of every pretraining document: pydoc topics, then stdlib docstrings."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{key}", text.strip()) for key, text in sorted(topics.items())]
    docs += list(_stdlib_docstrings())
    return [(name, text) for name, text in docs if text]


def _is_heldout(name: str, every: int) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % every == 0


def split_corpus(every: int | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """The pretraining texts and the held-out (name, text) documents (a stable 1-in-N by name)."""
    every = every or int(RECIPE["heldout_every"])
    train, heldout = [], []
    for name, text in corpus_documents():
        (heldout.append((name, text)) if _is_heldout(name, every) else train.append(text))
    return train, heldout


def general_heldout_texts(max_docs: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """Passages of the held-out prose: the same distribution the builtin base was pretrained
    on, never seen in pretraining. Paragraphs of 200-800 characters, a stable sample."""
    _, heldout = split_corpus()
    lo, hi = PARAGRAPH_CHARS
    rows = []
    for name, text in heldout:
        for i, para in enumerate(re.split(r"\n\s*\n", text)):
            para = para.strip()
            if lo <= len(para) <= hi and sum(c.isalpha() for c in para) > 0.6 * len(para):
                rows.append({"id": f"{name}#{i}", "text": para})
    random.Random(seed).shuffle(rows)
    return sorted(rows[:max_docs], key=lambda r: r["id"])


@functools.lru_cache(maxsize=1)
def corpus_digest() -> str:
    """What the corpus is made of, cheaply: the interpreter's version and the names and sizes of
    the files it is read from (parsing them all takes seconds; this is on every model lookup)."""
    from pydoc_data import topics

    h = hashlib.sha256(sys.version.encode())
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in [Path(topics.__file__), *sorted(root.glob("*.py"))]:
        h.update(f"{path.name}:{path.stat().st_size};".encode())
    return h.hexdigest()


def recipe() -> dict[str, Any]:
    """The recipe in force (the step count may come from FTFLOW_TINY_PRETRAIN_STEPS)."""
    out = dict(RECIPE)
    if os.environ.get(STEPS_ENV):
        out["steps"] = int(os.environ[STEPS_ENV])
    return out


def recipe_digest(rec: dict[str, Any], corpus: str) -> str:
    return hashlib.sha256(json.dumps({"recipe": rec, "corpus": corpus},
                                     sort_keys=True).encode()).hexdigest()[:12]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A GPT-2 style byte-level BPE (``ByteLevel`` pre-tokenizer with GPT-2's regex), saved as a
    standard fast tokenizer with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """save_pretrained, then make tokenizer_config.json standard: transformers 5 names the class
    ``TokenizersBackend`` (unknown to 4.x) and keeps the template only in chat_template.jinja."""
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    conf["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


def tiny_config(tokenizer: Any, rec: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    hidden = int(rec["hidden"])
    # Every Linear's output size is a multiple of 32: bitsandbytes' CPU 4-bit kernels need it.
    return LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden,
        intermediate_size=hidden * 2, num_hidden_layers=int(rec["layers"]),
        num_attention_heads=int(rec["heads"]), num_key_value_heads=int(rec["heads"]),
        max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _token_stream(tokenizer: Any, texts: Iterable[str]) -> Any:
    import torch

    sep = tokenizer.convert_tokens_to_ids("</s>")
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def mean_loss(model: Any, tokenizer: Any, texts: list[str], seq_len: int = 256,
              max_windows: int = 32) -> float:
    """Mean next-token cross-entropy (nats) of a model over texts, in windows of seq_len."""
    import torch

    stream = _token_stream(tokenizer, texts)[: max_windows * seq_len + 1]
    n = (len(stream) - 1) // seq_len * seq_len
    x, y = stream[:n].view(-1, seq_len), stream[1 : n + 1].view(-1, seq_len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), 16):
            logits = model(input_ids=x[i : i + 16]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), y[i : i + 16].reshape(-1),
                reduction="sum")
            total, count = total + float(loss), count + y[i : i + 16].numel()
    return total / max(count, 1)


def pretrain(model: Any, stream: Any, rec: dict[str, Any]) -> list[float]:
    """A plain causal-LM loop (nanoGPT style): random windows, AdamW, warmup + cosine decay."""
    import torch

    gen = torch.Generator().manual_seed(int(rec["seed"]))
    seq, batch, steps = int(rec["seq_len"]), int(rec["batch_size"]), int(rec["steps"])
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": rec["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=rec["lr"], betas=(0.9, 0.95))
    warm = int(rec["warmup_steps"])
    model.train()
    losses = []
    for step in range(steps):
        lr = rec["lr"] * (min(1.0, (step + 1) / warm) if step < warm else
                          0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) /
                                                          max(1, steps - warm))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq] for s in starts])
        y = torch.stack([stream[s + 1 : s + seq + 1] for s in starts])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log.info("pretrain %s step %d/%d loss %.3f", TINY_NAME, step + 1, steps, losses[-1])
    model.eval()
    return losses


def build_tiny_model(out_dir: str | Path, rec: dict[str, Any] | None = None) -> Path:
    """Train the tokenizer and pretrain the tiny Llama on the corpus; save with safetensors.
    Written to ``<out>.building`` and renamed: a half-built model never looks complete."""
    import torch

    rec = rec or recipe()
    threads = torch.get_num_threads()
    # A ~5 M parameter model gains little from threads, and on a shared machine OpenMP's
    # spin-waits made two threads several times slower than one (BENCHMARKS.md).
    torch.set_num_threads(1)
    try:
        return _build(Path(out_dir), rec)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, rec: dict[str, Any]) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, cpu_started = time.monotonic(), time.process_time()
    train_texts, heldout = split_corpus(int(rec["heldout_every"]))
    tokenizer = train_tokenizer(train_texts, int(rec["vocab_size"]))
    save_tokenizer(tokenizer, tmp)
    tokenizer_s = time.monotonic() - started
    log.info("tokenizer trained in %.1f s (%.1f s CPU)", tokenizer_s,
             time.process_time() - cpu_started)

    torch.manual_seed(int(rec["seed"]))
    config = tiny_config(tokenizer, rec)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    stream = _token_stream(tokenizer, train_texts)
    heldout_texts = [t for _, t in heldout]
    random_loss = mean_loss(model, tokenizer, heldout_texts[:8], int(rec["seq_len"]))
    losses = pretrain(model, stream, rec)
    pretrained_loss = mean_loss(model, tokenizer, heldout_texts[:8], int(rec["seq_len"]))
    model.save_pretrained(tmp)
    info = {
        "name": TINY_NAME, "recipe": rec, "corpus_digest": corpus_digest(),
        "train_documents": len(train_texts), "heldout_documents": len(heldout),
        "train_tokens": len(stream), "tokens_seen": int(rec["steps"]) * int(rec["batch_size"])
        * int(rec["seq_len"]), "parameters": model.num_parameters(),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_loss": {"random_init": random_loss, "pretrained": pretrained_loss},
        "seconds": {"tokenizer": round(tokenizer_s, 1),
                    "total": round(time.monotonic() - started, 1),
                    "cpu": round(time.process_time() - cpu_started, 1)},
        "torch_threads": torch.get_num_threads(),
    }
    (tmp / BUILTIN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("pretrained %s at %s: %d parameters, held-out loss %.3f (random init %.3f), %.0f s",
             TINY_NAME, out, info["parameters"], pretrained_loss, random_loss,
             info["seconds"]["total"])
    return out


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One builder at a time (parallel ranks, test processes); the others wait and reuse."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def builtin_path(home: str | Path, rec: dict[str, Any] | None = None) -> Path:
    """Where the builtin model of this recipe lives (built or not)."""
    rec = rec or recipe()
    return Path(home) / "models" / f"{TINY_NAME}-{recipe_digest(rec, corpus_digest())}"


def resolve_base_model(name: str, home: str | Path) -> str:
    """A path or hub id that ``from_pretrained`` accepts; builds builtin models on first use."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    builtin = name[len(BUILTIN_PREFIX):]
    if builtin != TINY_NAME:
        raise ValueError(f"unknown builtin model '{name}' (known: {BUILTIN_PREFIX}{TINY_NAME})")
    path = builtin_path(home)
    if not (path / BUILTIN_FILE).exists():
        with _build_lock(path):
            if not (path / BUILTIN_FILE).exists():
                log.info("pretraining %s once (cached in %s)", name, path)
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
