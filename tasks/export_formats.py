"""Export formats people run: a merged model folder both transformers 4.4x+ and 5.x load, the
LoRA adapter with a portable base id, lm-eval task folders that work on a copy, and an Ollama
Modelfile beside the GGUF files (tasks/export_gguf.py).

transformers 5 saves a tokenizer as ``TokenizersBackend`` with a list of ``extra_special_tokens``
and the chat template only in ``chat_template.jinja``, and a Llama config with ``rope_parameters``;
4.x knows none of these. The portable folder keeps what 5.x wrote and adds the 4.x spellings
(``PreTrainedTokenizerFast``, ``additional_special_tokens``, ``chat_template`` in
``tokenizer_config.json``, ``rope_theta``, ``torch_dtype``), which 5.x reads as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

FILE_MODE, DIR_MODE = 0o644, 0o755
LMEVAL_LOADER = "ftflow_data.py"
_LOADER_CODE = '''"""Loads this folder's task data next to this file, wherever the folder was copied."""

import json
from pathlib import Path

import datasets


def load_test_split(data_file: str, **_: object) -> dict:
    """lm-eval's custom_dataset hook: the task's JSONL as its test split."""
    path = Path(__file__).resolve().parent / data_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
'''


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_readable(root: Path) -> None:
    """Files 0644 and folders 0755: weights written owner-only cannot be served by another user."""
    os.chmod(root, DIR_MODE)
    for path in root.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def portable_tokenizer_config(folder: Path) -> None:
    """Add the transformers 4.x spellings to tokenizer_config.json (5.x reads them too)."""
    path = folder / "tokenizer_config.json"
    cfg = _read_json(path)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        if not (folder / "tokenizer.json").exists():
            raise ValueError(f"{folder}: a TokenizersBackend tokenizer without tokenizer.json "
                             "cannot be saved for transformers 4.x")
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        # 4.x's fast tokenizer also returns token_type_ids, which a causal LM's generate rejects
        cfg.setdefault("model_input_names", ["input_ids", "attention_mask"])
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):  # 4.x expects a dict of named tokens here
        cfg["additional_special_tokens"] = list(dict.fromkeys(
            [*cfg.get("additional_special_tokens", []), *extra]))
        del cfg["extra_special_tokens"]
    for key in ("is_local", "local_files_only"):  # facts of the training machine, not the model
        cfg.pop(key, None)
    template_file = folder / "chat_template.jinja"
    if template_file.exists() and "chat_template" not in cfg:
        cfg["chat_template"] = template_file.read_text(encoding="utf-8")
    _write_json(path, cfg)


def portable_model_config(folder: Path) -> None:
    """Add rope_theta/rope_scaling and torch_dtype beside 5.x's rope_parameters and dtype."""
    path = folder / "config.json"
    cfg = _read_json(path)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    _write_json(path, cfg)


def write_merged(merged_dir: Path, dest: Path) -> Path:
    """The merged model folder, loadable by transformers 4.4x-4.5x and 5.x, readable by all."""
    shutil.copytree(merged_dir, dest)
    portable_tokenizer_config(dest)
    portable_model_config(dest)
    make_readable(dest)
    return dest


def portable_base_id(base_model: str) -> str:
    """A base id that means the same on another machine: a hub id as is, a local folder by its
    name (the model card says where it came from)."""
    from tasks.base_model import BUILTIN_FILE, BUILTIN_PREFIX, TINY_NAME

    if base_model.startswith(BUILTIN_PREFIX):
        return base_model[len(BUILTIN_PREFIX):]
    if os.path.isabs(base_model) or os.path.exists(base_model):
        if (Path(base_model) / BUILTIN_FILE).exists():  # <home>/models/tiny-llama-<digest>
            return TINY_NAME
        return Path(base_model).name
    return base_model


def write_adapter(adapter_dir: Path, dest: Path, base_model: str) -> Path:
    """The LoRA adapter with a portable base id in adapter_config.json and the 4.x tokenizer."""
    shutil.copytree(adapter_dir, dest)
    cfg_path = dest / "adapter_config.json"
    cfg = _read_json(cfg_path)
    cfg["base_model_name_or_path"] = portable_base_id(base_model)
    _write_json(cfg_path, cfg)
    if (dest / "tokenizer_config.json").exists():
        portable_tokenizer_config(dest)
    make_readable(dest)
    return dest


def write_lmeval_tasks(tasks_dir: Path, dest: Path) -> tuple[list[str], list[str]]:
    """Copy the evaluate stage's lm-eval tasks so that ``lm_eval --include_path`` works on a copy:
    each task reads its JSONL beside its YAML through a loader next to them, no absolute path.
    Returns the tasks copied and the files left out (not a single-file JSON task), with why."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / LMEVAL_LOADER).write_text(_LOADER_CODE, encoding="utf-8")
    names, skipped = [], []
    for task_file in sorted(tasks_dir.glob("*.yaml")):
        try:
            spec = yaml.safe_load(task_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:  # e.g. a !function tag: not ours to rewrite
            skipped.append(f"{task_file.name} ({str(err).splitlines()[0]})")
            continue
        files = (spec.get("dataset_kwargs") or {}).get("data_files") or {}
        if spec.get("dataset_path") != "json" or not isinstance(files, dict) or len(files) != 1:
            skipped.append(f"{task_file.name} (not a single-file JSON task)")
            continue
        split, data_file = next(iter(files.items()))
        data = Path(data_file)
        if not data.is_absolute():
            data = task_file.parent / data
        shutil.copy(data, dest / data.name)
        spec.pop("dataset_path")
        spec["dataset_kwargs"] = {"data_file": data.name}
        spec["test_split"] = "test" if spec.get("test_split") == split else spec.get("test_split")
        text = yaml.safe_dump(spec, sort_keys=False)
        # a YAML tag safe_dump cannot write: lm-eval resolves it next to the YAML file
        text += f"custom_dataset: !function {Path(LMEVAL_LOADER).stem}.load_test_split\n"
        (dest / task_file.name).write_text(text, encoding="utf-8")
        names.append(str(spec["task"]))
    make_readable(dest)
    return names, skipped


# Ollama speaks Go templates, not Jinja: the known chat formats, recognised by their markers.
OLLAMA_TEMPLATES = {
    "<|im_start|>": ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                     "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
                     "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
                     ["<|im_end|>", "<|im_start|>"]),
    "<|start_header_id|>": ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n"
                            "{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>"
                            "user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}"
                            "<|eot_id|>", ["<|eot_id|>", "<|start_header_id|>"]),
}


def ollama_template(chat_template: str) -> tuple[str, list[str]]:
    """The Go template and stop tokens for a Jinja chat template of a known format."""
    for marker, (template, stops) in OLLAMA_TEMPLATES.items():
        if marker in chat_template:
            return template, stops
    raise ValueError("the chat template is not one Ollama's Modelfile can be written for "
                     f"(known: {', '.join(OLLAMA_TEMPLATES)}); write the TEMPLATE by hand")


def modelfile(gguf_name: str, chat_template: str, system_prompt: str,
              parameters: dict[str, float | int]) -> str:
    """An Ollama Modelfile: FROM the GGUF, TEMPLATE, stop tokens, PARAMETERs, SYSTEM."""
    template, stops = ollama_template(chat_template)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in parameters.items()]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"


def strip_generation_markers(template: str) -> str:
    """The chat template without trl's {% generation %} markers, which only transformers knows."""
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)
