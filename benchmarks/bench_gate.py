"""What the release gate sees: base vs tuned on the tests' support chats, for a real fine-tune, one
tuned on the same chats with their replies shuffled across chats, and one with damaged weights.

The models: LoRA through the real train stage (``tests/model_fixtures.build_train_dir``, the
test suite's recipe: 30 steps, lr 3e-3), the same with shuffled replies, the first with seeded
noise at 3x each matrix's spread; and, with ``--full-steps N``, a full fine-tune of every
weight by a plain torch loop (N steps, lr 1e-3, loss on the reply only) on the real and on the
shuffled chats, to show what the association metric sees once a model has learned which reply
goes with which question. Each is evaluated by the evaluate stage (lm-eval) on the tests'
held-out chats. Prints a markdown table (and writes it to ``--out``).

    FTFLOW_TINY_PRETRAIN_STEPS=60 nice .venv/bin/python benchmarks/bench_gate.py \\
        --work /tmp/bench-gate --full-steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import model_bench_args, model_bench_dirs  # noqa: E402  (benchmarks/common.py)
from data_contracts.config import EvaluateConfig  # noqa: E402
from data_contracts.manifest import Manifest  # noqa: E402
from model_fixtures import (build_train_dir, damaged_train_dir, one_torch_thread,  # noqa: E402
                            shuffle_replies, support_chats, train_dir_with_model,
                            write_stage_dir)
from tasks.evaluate import MC_TASK, PPL_TASK, PROSE_TASK, run_evaluate  # noqa: E402

TARGETS = [f"{PPL_TASK}.word_perplexity", f"{MC_TASK}.acc_mutual_info"]


def damaged(root: Path, train_dir: Path) -> Path:
    return root if (root / "manifest.json").exists() else damaged_train_dir(root, train_dir)


def full_finetune(root: Path, train_dir: Path, shuffled: bool, steps: int) -> Path:
    """Every weight of the base, AdamW lr 1e-3, batch 8, loss on the final reply only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (root / "manifest.json").exists():
        return root
    base = Manifest.read(train_dir).info["base_model"]
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    chats = support_chats(64, seed=1)
    rows = []
    for chat in shuffle_replies(chats) if shuffled else chats:
        msgs = [m.model_dump() for m in chat.messages]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
        rows.append((ids["input_ids"], len(tok(prompt, add_special_tokens=False)["input_ids"])))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    for _ in range(steps):
        batch = rng.sample(rows, 8)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((8, width), tok.pad_token_id or 0)
        labels = torch.full((8, width), -100)
        for i, (row, start) in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, start:len(row)] = torch.tensor(row[start:])
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return train_dir_with_model(root, train_dir, model)


def _cell(m: Manifest, task: str, metric: str, change: bool = True) -> str:
    t = m.metrics.get(f"tuned.{task}.{metric}")
    err = m.metrics.get(f"stderr.tuned.{task}.{metric}")
    text = "-" if t is None else f"{t:.4g}" + (f" ±{err:.2g}" if err is not None else "")
    delta = m.metrics.get(f"gate.target.{task}.{metric}.change",
                          m.metrics.get(f"gate.general.{task}.{metric}.change"))
    if change and delta is not None:
        text += f" ({delta * 100:+.1f} pts)" if metric.startswith("acc") else f" ({delta:+.1%})"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_bench_args(ap, "/tmp/bench-gate", REPO / "benchmarks" / "results" / "gate.md")
    ap.add_argument("--full-steps", type=int, default=0, help="0: no full fine-tunes")
    args = ap.parse_args()
    work, home = model_bench_dirs(args)
    started = time.monotonic()
    with one_torch_thread():
        real = build_train_dir(work / "real", home)
        models = {"LoRA 30 steps, lr 3e-3 (the tests' train_dir)": real,
                  "the same, **replies shuffled** across chats":
                      build_train_dir(work / "shuf", home, shuffled=True),
                  "the first, weights damaged (noise 3x each matrix's std)":
                      damaged(work / "damaged", real)}
        if args.full_steps:
            n = args.full_steps
            models[f"full fine-tune, {n} steps, lr 1e-3"] = full_finetune(
                work / f"full{n}", real, False, n)
            models["the same, **replies shuffled**"] = full_finetune(
                work / f"full{n}-shuf", real, True, n)
        data = work / "eval-data"
        if not (data / "manifest.json").exists():
            write_stage_dir(data, support_chats(20, seed=20),
                            support_chats(12, seed=21, prefix="h"))
        cfg = EvaluateConfig(max_samples=10, num_choices=3, general_prose=24, targets=TARGETS)
        results = {name: run_evaluate(data, train, work / f"eval-{train.name}", cfg, home=home)
                   for name, train in models.items()}
    first = next(iter(results.values()))
    base = {k[len("base."):]: v for k, v in first.metrics.items() if k.startswith("base.")}
    err = {k[len("stderr.base."):]: v for k, v in first.metrics.items()
           if k.startswith("stderr.base.")}

    def b(name: str) -> str:
        return f"{base[name]:.4g} ±{err.get(name, float('nan')):.2g}"

    lines = [f"Command: `{' '.join(['benchmarks/bench_gate.py', *sys.argv[1:]])}`; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.node()}, "
             f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
             f"{time.monotonic() - started:.0f} s wall. 10 held-out chats (3 choices), 24 prose "
             "passages; targets " + ", ".join(f"`{t}`" for t in TARGETS) + " (min_gain 0, "
             "min_gain_stderrs 1), general prose bits/byte (max_regression 0.10).", "",
             f"| tuned model | target: chats word ppl (base {b(f'{PPL_TASK}.word_perplexity')}) "
             f"| target: reply choice acc_mutual_info (base "
             f"{b(f'{MC_TASK}.acc_mutual_info')}) | reply choice acc (base "
             f"{b(f'{MC_TASK}.acc')}) | general: prose bits/byte (base "
             f"{b(f'{PROSE_TASK}.bits_per_byte')}) | gate |",
             "|---|---:|---:|---:|---:|---|"]
    for name, m in results.items():
        checks = json.loads(Path(m.info["results"]).read_text())["gate"]["checks"]
        failed = [c["metric"] for c in checks if not c["passed"]]
        verdict = "passed" if m.info["gate_passed"] else "failed"
        if failed:
            verdict += ": " + ", ".join(failed)
        lines.append(f"| {name} | {_cell(m, PPL_TASK, 'word_perplexity')} | "
                     f"{_cell(m, MC_TASK, 'acc_mutual_info')} | "
                     f"{_cell(m, MC_TASK, 'acc', change=False)} | "
                     f"{_cell(m, PROSE_TASK, 'bits_per_byte')} | {verdict} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
