"""QLoRA at a real model shape: our train stage against a plain transformers + peft QLoRA script.

    # on a CUDA machine (the issue's figure): Llama-3-8B shape, random weights, 2048 tokens
    python benchmarks/bench_train_gpu.py --shape llama3-8b --seq 2048 --steps 12
    # anywhere, to check the script itself: the tiny shape on CPU
    .venv/bin/python benchmarks/bench_train_gpu.py --shape tiny --seq 256 --steps 2

Nothing is downloaded. The model is built with ``from_config`` from a Llama-3-8B-shaped config
(hidden 4096, 32 layers, GQA 32/8 heads, MLP 14336, vocabulary 128,256), so it has random weights,
and it is saved as safetensors under ``--work``. The ids come from the builtin tiny tokenizer
(vocabulary 4,096 < 128,256, so every id exists in the model); the LM head still runs over all
128,256 columns, as in the real model. Both sides then load that folder 4-bit (NF4, double
quantisation, bf16 compute on CUDA), put LoRA r=16 alpha=32 dropout=0.05 on every linear layer,
use gradient checkpointing and paged 8-bit AdamW (plain AdamW on CPU), batch 1, and train on
the same chats, each one ``--seq`` tokens long after truncation.

- ``hf``: the obvious script, ``transformers.Trainer`` + ``peft``: ``prepare_model_for_kbit_training``,
  ``get_peft_model``, a causal-LM collator, loss on every token.
- ``ours``: ``tasks.train.run_train`` with ``method=qlora``, its defaults otherwise (loss on
  assistant tokens, length grouping, trl's fused LM head).

Not yet run on a GPU (no task so far was lent one); checked end to end on CPU at the tiny shape
(2026-11-30). At 8B, ``ours`` includes the stage's merge and export of a full bf16 copy (~16 GB
written), outside its measured figures but inside the wall time: budget ~10 min for the build
(16 GB of safetensors) and both runs, or run ``--kinds hf`` and ``--kinds ours`` as separate
calls on the same ``--work`` folder (the model is built once).

Each side runs in its own process. Peak memory is ``torch.cuda.max_memory_allocated`` (the
figure torchtune and Unsloth report), or peak RSS on CPU; tokens/s counts real tokens over the
trainer's ``train_runtime``. Anchors from the issue: torchtune, Llama-3.1-8B QLoRA on an RTX 4090:
7.4 GiB, 2,413 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # meta-llama/Meta-Llama-3-8B's config.json, less the weights
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                 max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5),
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
WORDS = ("account invoice refund delivery password coupon order parcel warehouse billing "
         "address payment card subscription plan upgrade error screen login device app "
         "settings email phone support ticket status weekend morning customer answer").split()


def build_model(shape: str, out: Path, home: Path) -> Path:
    """Random weights in the shape's config, saved as safetensors with the tiny tokenizer."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.base_model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("builtin:tiny-llama", home))
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 8B on GPU: seconds
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(str(out))
    del model
    return out


def make_records(n: int, seq: int, seed: int = 0) -> list[dict]:
    """Support chats long enough to fill ``seq`` tokens (the tiny tokenizer: ~1.3 per word)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(40)) + "?"
        answer = ". ".join(" ".join(rng.choice(WORDS) for _ in range(12))
                           for _ in range(seq // 10)) + "."
        rows.append({"id": f"g{i}", "messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]})
    return rows


def worker_hf(model_dir: Path, src: Path, out: Path, seq: int, steps: int) -> dict:
    """transformers.Trainer + peft QLoRA, as the peft/bitsandbytes docs show it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForLanguageModeling, Trainer, TrainingArguments)

    from tasks.io import read_records
    from tasks.train_steps import peak_mem_mb

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant,
                                                 dtype=compute, device_map={"": 0} if cuda
                                                 else None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"input_ids": tokenizer.apply_chat_template(
        [m.model_dump() for m in r.messages], tokenize=True, return_dict=True)["input_ids"][:seq]}
        for r in read_records(src, "train")]
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=1,
                             learning_rate=2e-4, logging_steps=1, save_strategy="no",
                             report_to=[], bf16=cuda, gradient_checkpointing=True,
                             optim="paged_adamw_8bit" if cuda else "adamw_torch",
                             use_cpu=not cuda, disable_tqdm=True, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train()
    tokens = sum(min(len(r["input_ids"]), seq) for r in rows[:steps])
    return {"tokens": float(tokens), "runtime": float(result.metrics["train_runtime"]),
            "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
            "peak_mb": peak_mem_mb(cuda)}


def worker_ours(model_dir: Path, src: Path, out: Path, seq: int, steps: int, home: Path) -> dict:
    from data_contracts.config import LoraConfig, TrainConfig
    from tasks.train import run_train

    cfg = TrainConfig(base_model=str(model_dir), method="qlora", max_steps=steps, batch_size=1,
                      max_length=seq, learning_rate=2e-4, save_steps=10_000, logging_steps=1,
                      lora=LoraConfig(**LORA))
    m = run_train(src, out, cfg, home=home)
    history = [json.loads(line) for line in Path(m.info["history_file"]).read_text().splitlines()]
    return {"tokens": m.metrics["train_tokens"], "runtime": m.metrics["train_runtime_s"],
            "loss": m.metrics["train_loss"], "quantized": m.info["quantized"],
            "optimizer": m.info["optimizer"],
            "peak_mb": [h["peak_mem_mb"] for h in history if "peak_mem_mb" in h][-1]}


def _run(kind: str, args: argparse.Namespace, model_dir: Path, src: Path, work: Path) -> dict:
    result = work / f"{kind}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", str(model_dir),
           "--src", str(src), "--work", str(work), "--seq", str(args.seq),
           "--steps", str(args.steps), "--result", str(result)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--kinds", default="hf,ours")
    p.add_argument("--work", help="folder for the model and runs (default: a temp dir)")
    p.add_argument("--write", help="markdown file for the results")
    p.add_argument("--worker")
    p.add_argument("--model-dir")
    p.add_argument("--src")
    p.add_argument("--result")
    args = p.parse_args()
    if args.worker:
        work = Path(args.work)
        out = Path(tempfile.mkdtemp(dir=work, prefix=f"{args.worker}-"))
        if args.worker == "hf":
            res = worker_hf(Path(args.model_dir), Path(args.src), out, args.seq, args.steps)
        else:
            res = worker_ours(Path(args.model_dir), Path(args.src), out, args.seq, args.steps,
                              work / "home")
        Path(args.result).write_text(json.dumps(res))
        return

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train_cpu import _write_stage_dir

    work = Path(args.work or tempfile.mkdtemp(prefix="ftflow-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = build_model(args.shape, work / f"model-{args.shape}", work / "home")
    built_s = time.time() - started
    src = work / "records"
    if not (src / "manifest.json").exists():
        _write_stage_dir(make_records(max(args.steps, 8), args.seq), src)
    results = {kind: _run(kind, args, model_dir, src, work) for kind in args.kinds.split(",")}
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"{os.cpu_count()}-core CPU ({platform.machine()})")
    memory = "peak GPU memory (max_memory_allocated)" if torch.cuda.is_available() \
        else "peak RSS"
    lines = [
        f"Command: `python benchmarks/bench_train_gpu.py --shape {args.shape} --seq {args.seq} "
        f"--steps {args.steps} --kinds {args.kinds}`",
        f"Device: {device}; torch {torch.__version__}; date "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; model built in {built_s:.0f} s; "
        f"batch 1 x {args.seq} tokens, {args.steps} steps, LoRA r={LORA['r']} all-linear, NF4",
        "",
        f"| trainer | tokens/s | {memory}, GiB | train tokens | final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, r in results.items():
        lines.append(f"| {kind} | {r['tokens'] / r['runtime']:.0f} | {r['peak_mb'] / 1024:.2f} "
                     f"| {r['tokens']:.0f} | {r['loss']:.3f} |")
    print("\n".join(lines))
    if args.write:
        Path(args.write).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
