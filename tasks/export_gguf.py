"""GGUF files of the merged model (llama.cpp, Ollama, LM Studio), written with the official
``gguf`` package: Llama-architecture models, byte-level BPE tokenizers, f16 and q8_0.

llama.cpp's own converter recognises a BPE tokenizer by hashing how it splits a fixed text, so it
refuses any tokenizer trained for this data ("BPE pre-tokenizer was not recognized"). Here the
pre-tokenizer is read from ``tokenizer.json`` instead: GPT-2's byte-level split (what the demo
tokenizer and GPT-2-style models use) is written as llama.cpp's ``gpt-2`` pre-tokenizer; any other
gets a clear message naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_contracts.config import FinalError

SUPPORTED_ARCHS = {"LlamaForCausalLM"}
QUANTS = ("f16", "q8_0")


class GGUFExportError(ValueError, FinalError):
    """The model or tokenizer is one this writer cannot convert; the message says why."""


def _pre_tokenizer(tok: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a clear error."""
    model, pre = tok.get("model", {}), tok.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} is not BPE: only "
                              "byte-level BPE tokenizers are converted to GGUF here")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise GGUFExportError("a ByteLevel pre-tokenizer with add_prefix_space=true has no "
                                  "llama.cpp equivalent")
        return "gpt-2"
    raise GGUFExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp knows "
        "under a name (this writer maps ByteLevel with GPT-2's split to 'gpt-2'); convert this "
        "model with llama.cpp's convert_hf_to_gguf.py after registering its pre-tokenizer there")


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """Tokens, their types, merges and the pre-tokenizer name from tokenizer.json."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(f"{folder}: no tokenizer.json (a fast tokenizer is needed)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    pre = _pre_tokenizer(tok)
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, added in special.items():
        by_id[i] = added["content"]
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(f"tokenizer has id {max(by_id)} but the model's vocab is "
                              f"{vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is padded past the tokenizer (a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if special[i].get("special")
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges, pre


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout of q/k rows to llama.cpp's (as its converter does)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).float().numpy()
    if not out:
        raise GGUFExportError(f"{folder}: no safetensors weights")
    return out


def write_gguf(merged_dir: str | Path, out_file: str | Path, quant: str,
               chat_template: str, name: str) -> Path:
    """Convert the merged Llama model folder to one GGUF file (f16 or q8_0)."""
    import gguf

    folder, out = Path(merged_dir), Path(out_file)
    if quant not in QUANTS:
        raise GGUFExportError(f"quantization {quant!r} is not supported (choose from {QUANTS})")
    cfg = json.loads((folder / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHS:
        raise GGUFExportError(f"architecture {arch} is not supported by the GGUF export "
                              f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads",
                                                       cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise GGUFExportError("RoPE scaling is not supported by the GGUF export")
    tokens, types, merges, pre = _vocab(folder, cfg["vocab_size"])

    writer = gguf.GGUFWriter(str(out.with_name(out.name + ".partial")), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16"
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        if isinstance(tok_cfg.get(key), str) and tok_cfg[key] in ids:
            add(ids[tok_cfg[key]])
    # The tokenizer adds no BOS itself (the chat template writes what it needs).
    writer.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    qtype = gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.Q8_0
    tensors = _tensors(folder)
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for key, data in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(f"no GGUF name for tensor {key}")
        if key.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif key.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1:  # norms stay f32, as llama.cpp's converter keeps them
            writer.add_tensor(new, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(new, data.astype(np.float16))
        else:
            writer.add_tensor(new, gguf.quants.quantize(data.astype(np.float32), qtype),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out.with_name(out.name + ".partial"), out)
    os.chmod(out, 0o644)
    return out


def read_gguf(path: str | Path) -> dict[str, Any]:
    """What a consumer sees in a GGUF file: architecture, tensors, chat template, special ids."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    return {
        "architecture": value("general.architecture"),
        "tensor_count": len(reader.tensors),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "chat_template": value("tokenizer.chat_template"),
        "tokenizer_model": value("tokenizer.ggml.model"),
        "pre": value("tokenizer.ggml.pre"),
        "tokens": value("tokenizer.ggml.tokens"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "pad_token_id": value("tokenizer.ggml.padding_token_id"),
        "file_type": value("general.file_type"),
    }
