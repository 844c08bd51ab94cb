"""The gate that fails: a LoRA fine-tune that learns which reply answers which question against the
same recipe on replies shuffled across chats, per seed, through the real train and evaluate
stages (the fixtures of ``tests/test_export_registry.py``: ``worded_base``, ``topic_chats``,
``build_topic_train_dir``). Prints a markdown table (and writes it to ``--out``).

    FTFLOW_TINY_PRETRAIN_STEPS=60 OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python \\
        benchmarks/bench_gate_topics.py --work /tmp/bench-gate-topics --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import model_bench_args, model_bench_dirs  # noqa: E402  (benchmarks/common.py)
from data_contracts.config import EvaluateConfig  # noqa: E402
from model_fixtures import (build_topic_train_dir, one_torch_thread, topic_chats,  # noqa: E402
                            worded_base, write_stage_dir)
from tasks.evaluate import MC_TASK, PPL_TASK, run_evaluate  # noqa: E402

REPLY = f"{MC_TASK}.acc_mutual_info"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_bench_args(ap, "/tmp/bench-gate-topics",
                     REPO / "benchmarks" / "results" / "gate_topics.md")
    ap.add_argument("--seeds", default="0,1,2", help="train seed = shuffle seed")
    args = ap.parse_args()
    work, home = model_bench_dirs(args)
    started, cpu = time.monotonic(), time.process_time()
    with one_torch_thread():
        base = worded_base(work / "worded-base", home)
    prime_cpu = time.process_time() - cpu
    data = write_stage_dir(work / "heldout", topic_chats(4, seed=20),
                           topic_chats(36, seed=21, prefix="h"))
    cfg = EvaluateConfig(max_samples=36, num_choices=4, general_prose=0, targets=[REPLY],
                         min_gain=0.2)  # the test's settings
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for kind in ("real", "shuffled"):
            cpu = time.process_time()
            train = build_topic_train_dir(work / f"{kind}-{seed}", base, home,
                                          kind == "shuffled", seed=seed)
            train_cpu = time.process_time() - cpu
            with one_torch_thread():
                m = run_evaluate(data, train, work / f"eval-{kind}-{seed}", cfg, home=home)
            mt = m.metrics

            def cell(metric: str, label: str = "tuned") -> str:
                err = mt.get(f"stderr.{label}.{metric}")
                return f"{mt[f'{label}.{metric}']:.3g}" + (f" ±{err:.2g}" if err else "")

            rows.append(f"| {seed} | {kind} | {cell(REPLY, 'base')} | {cell(REPLY)} | "
                        f"{mt[f'gate.target.{REPLY}.change'] * 100:+.1f} pts | "
                        f"{cell(f'{MC_TASK}.acc', 'base')} | {cell(f'{MC_TASK}.acc')} | "
                        f"{mt[f'base.{PPL_TASK}.word_perplexity']:.4g} -> "
                        f"{mt[f'tuned.{PPL_TASK}.word_perplexity']:.4g} | {train_cpu:.0f} | "
                        f"{'passed' if m.info['gate_passed'] else 'failed'} |")
    lines = [f"Command: `{' '.join(['benchmarks/bench_gate_topics.py', *sys.argv[1:]])}`; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.node()}, "
             f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
             f"{time.monotonic() - started:.0f} s wall; worded base {prime_cpu:.0f} CPU-s. "
             f"36 held-out chats, 4 choices; target `{REPLY}` (min_gain 0.2, "
             "min_gain_stderrs 1), no general task.", "",
             "| seed | replies | base acc_mutual_info | tuned acc_mutual_info | change | base acc "
             "| tuned acc | chats word ppl base -> tuned | train CPU-s | gate |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
