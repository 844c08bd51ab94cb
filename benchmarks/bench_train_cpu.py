"""CPU training throughput: our train stage (run_train) against a plain trl SFTTrainer script.

    .venv/bin/python benchmarks/bench_train_cpu.py [--repeats 3] [--steps 12] [--lora]
        [--write benchmarks/results/train_cpu.md]

Both sides train the builtin tiny Llama on the same records (varied lengths, max_length 512),
with the same LoRA (r, alpha, dropout, all-linear), batch size, steps, learning rate and
quantization, and the same precision: fp32 compute, as our stage uses on CPU (trl's SFTConfig
would otherwise default to bf16 autocast, which is other work with smaller activations). Each run
is its own subprocess. Tokens/s counts real (non-padding) training tokens, as trl counts them
(attention mask sum, or the flattened length in padding-free batches), over the trainer's
train_runtime (the training loop, without imports, model loading or our stage's merge/export).
Peak RSS is reported twice: at the end of training (the kernel's high-water mark, VmHWM; ours
from its history's last ``peak_mem_mb``), which is the like-for-like figure, and for the whole
process (``ru_maxrss``), which for ours also covers record checks, the merge and the export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("account invoice refund delivery password coupon order parcel warehouse billing "
         "address payment card subscription plan upgrade error screen login device app "
         "settings email phone support ticket status weekend morning customer answer").split()
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
MAX_LENGTH, BATCH, LR = 512, 8, 2e-4


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Support chats whose lengths vary like real ones: mostly short, a long tail."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = rng.choice([1, 1, 1, 2, 3])
        messages = []
        for _ in range(turns):
            messages.append({"role": "user",
                             "content": _sentence(rng, int(rng.lognormvariate(3.0, 0.8)) + 3)})
            messages.append({"role": "assistant",
                             "content": _sentence(rng, int(rng.lognormvariate(3.3, 0.8)) + 3)})
        rows.append({"id": f"b{i}", "messages": messages})
    return rows


def _write_stage_dir(rows: list[dict], path: Path) -> None:
    from data_contracts.records import ChatSample
    from tasks.stage_dir import StageWriter

    writer = StageWriter(path, "dedup")
    for row in rows:
        writer.keep(ChatSample(**row), "train")
    writer.finish(len(rows), input_digests={}, config_digest="bench")


# --- the two workers (each in its own process) -----------------------------------------------

def _peak_rss_mb() -> float:
    """The process's resident-set high-water mark so far (VmHWM), as the stage reports it
    (tasks/train_steps.py: peak_mem_mb).

    Read here rather than imported, so the trl worker does not load our stage (and Prefect).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(src: Path, out: Path, home: Path, method: str, steps: int,
                settings: dict[str, str]) -> dict:
    """The stage with its defaults, but for the shared settings and the kind's overrides."""
    from data_contracts.config import LoraConfig, TrainConfig
    from tasks.train import run_train

    cfg = TrainConfig(method=method, max_steps=steps, batch_size=BATCH, max_length=MAX_LENGTH,
                      learning_rate=LR, save_steps=10_000, logging_steps=1,
                      lora=LoraConfig(**LORA), **settings)
    m = run_train(src, out, cfg, home=home)
    history = [json.loads(line) for line in Path(m.info["history_file"]).read_text().splitlines()]
    return {"tokens": m.metrics["train_tokens"], "runtime": m.metrics["train_runtime_s"],
            "loss": m.metrics["train_loss"], "quantized": m.info["quantized"],
            "train_peak_rss_mb": [h["peak_mem_mb"] for h in history if "peak_mem_mb" in h][-1]}


def worker_trl(src: Path, out: Path, home: Path, method: str, steps: int) -> dict:
    """The obvious user script: SFTTrainer defaults, no packing, default padding."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from tasks.base_model import resolve_base_model
    from tasks.io import read_records

    base = resolve_base_model("builtin:tiny-llama", home)
    rows = [{"messages": [m.model_dump() for m in r.messages]} for r in read_records(src, "train")]
    quant = None
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    args = SFTConfig(output_dir=str(out), max_length=MAX_LENGTH, max_steps=steps,
                     per_device_train_batch_size=BATCH, learning_rate=LR, logging_steps=1,
                     assistant_only_loss=True, use_cpu=True, report_to=[], disable_tqdm=True,
                     save_strategy="no", seed=42,
                     bf16=False)  # fp32 compute like ours (trl's default would be bf16 autocast)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config)
    result = trainer.train()
    train_peak = _peak_rss_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": float(trainer._total_train_tokens),
            "runtime": float(result.metrics["train_runtime"]), "loss": losses[-1],
            "quantized": method == "qlora", "train_peak_rss_mb": train_peak}


def _worker_main(args: argparse.Namespace) -> None:
    src, out, home = Path(args.src), Path(args.out), Path(args.home)
    if args.worker == "trl":
        res = worker_trl(src, out, home, args.method, args.steps)
    else:  # "ours" or "ours:key=value+key=value" (TrainConfig fields)
        spec = args.worker.partition(":")[2]
        settings = dict(kv.split("=", 1) for kv in spec.split("+") if kv)
        res = worker_ours(src, out, home, args.method, args.steps, settings)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(res))


# --- the driver ------------------------------------------------------------------------------

def _run_one(kind: str, method: str, src: Path, home: Path, steps: int, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{kind}-{method}-"))
    result = out / "result.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--method", method, "--src", str(src),
           "--out", str(out / "run"), "--home", str(home), "--steps", str(steps),
           "--result", str(result)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


def _table(results: dict[tuple[str, str], list[dict]]) -> list[str]:
    lines = ["| method | trainer | tokens/s (median) | tokens/s (runs) | peak RSS MB, training "
             "(median) | peak RSS MB, training (runs) | peak RSS MB, whole process (median) "
             "| train tokens | final train loss | speed-up vs trl |",
             "|---|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for (method, kind), runs in results.items():
        tps = [r["tokens"] / r["runtime"] for r in runs]
        train_peaks = [r["train_peak_rss_mb"] for r in runs]
        base = results.get((method, "trl"))
        ref = statistics.median(r["tokens"] / r["runtime"] for r in base) if base else None
        speed = f"{statistics.median(tps) / ref:.2f}x" if ref else "-"
        lines.append(
            f"| {method} | {kind} | {statistics.median(tps):.0f} | "
            f"{', '.join(f'{t:.0f}' for t in tps)} | "
            f"{statistics.median(train_peaks):.0f} | "
            f"{', '.join(f'{peak:.0f}' for peak in train_peaks)} | "
            f"{statistics.median(r['peak_rss_mb'] for r in runs):.0f} | "
            f"{statistics.median(r['tokens'] for r in runs):.0f} | "
            f"{statistics.median(r['loss'] for r in runs):.3f} | {speed} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", help="trl, ours or ours:key=value+key=value (TrainConfig)")
    p.add_argument("--method", default="qlora")
    p.add_argument("--src")
    p.add_argument("--out")
    p.add_argument("--home")
    p.add_argument("--result")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--records", type=int, default=240)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora", action="store_true", help="also compare with plain LoRA")
    p.add_argument("--kinds", default="trl,ours",
                   help="comma list of trl, ours, ours:key=value+key=value (TrainConfig fields)")
    p.add_argument("--write", help="markdown file for the results")
    args = p.parse_args()
    if args.worker:
        return _worker_main(args)

    tmp = Path(tempfile.mkdtemp(prefix="ftflow-bench-train-"))
    home = Path(args.home) if args.home else tmp / "home"
    from tasks.base_model import resolve_base_model

    resolve_base_model("builtin:tiny-llama", home)  # built once, outside every timing
    src = tmp / "records"
    _write_stage_dir(make_records(args.records), src)
    methods = ["qlora", "lora"] if args.lora else ["qlora"]
    kinds = args.kinds.split(",")
    results: dict[tuple[str, str], list[dict]] = {(m, k): [] for m in methods for k in kinds}
    started = time.time()
    for _ in range(args.repeats):  # interleaved, so background load hits every variant alike
        for method in methods:
            for kind in kinds:
                results[(method, kind)].append(_run_one(kind, method, src, home, args.steps, tmp))
    lines = [
        f"Command: `.venv/bin/python benchmarks/bench_train_cpu.py --repeats {args.repeats} "
        f"--steps {args.steps} --records {args.records}{' --lora' if args.lora else ''} "
        f"--kinds {args.kinds}`",
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"no GPU; date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{args.records} chat records, max_length {MAX_LENGTH}, batch {BATCH}, "
        f"{args.steps} optimizer steps, LoRA r={LORA['r']} alpha={LORA['alpha']} all-linear; "
        f"wall time {time.time() - started:.0f} s",
        "",
        *_table(results),
    ]
    print("\n".join(lines))
    if args.write:
        Path(args.write).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
