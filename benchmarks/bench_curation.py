"""Does curation pay? The same base, the same token budget, trained on the raw corpus and on the
curated one, compared on the same clean held-out set.

    nice .venv/bin/python benchmarks/bench_curation.py [--records 3000] [--tokens 200000]

The corpus is bench_scale.py's seeded support-chat corpus: ~12% of records with planted PII,
~6% near and ~2% exact duplicates, ~6% junk (other languages, keyboard mash, spam, pasted logs,
mojibake), broken JSON lines. Two training sets come from it:

- **curated**: the real stages, ingest (filters) -> PII -> dedup; dedup also carves the
  held-out split and removes training records that near-duplicate it;
- **raw**: every parseable record as it is (a bare read-parse pass, no filter, no PII scrub,
  no dedup), minus the held-out records and anything within Jaccard 0.5 of one (the same
  decontamination the curated set had, so neither side has seen the test).

Both train the same base (`builtin:tiny-llama`, LoRA, same hyperparameters) for as many steps
as their records' mean token length allows within the same token budget (the train manifest's
`train_tokens` is reported to check it), and the evaluate stage scores both on the curated
held-out split (clean: filtered, scrubbed). Also counted: planted PII values present in each
training set. Writes benchmarks/results/curation.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HERE = Path(__file__).resolve().parent

from flows.env import quiet_offline_env  # noqa: E402

quiet_offline_env()


def shingles(text: str, n: int = 5) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(max(1, len(words) - n + 1))}


def rec_text(rec: Any) -> str:
    return "\n".join(m.content for m in rec.conversation()) if rec.messages else (rec.text or "")


def decontaminated(records: list[Any], heldout: list[Any], threshold: float = 0.5) -> list[Any]:
    """Records not in the held-out set and not within Jaccard `threshold` of a held-out one."""
    held = [shingles(rec_text(r)) for r in heldout]
    held_ids = {r.id for r in heldout}
    keep = []
    for rec in records:
        s = shingles(rec_text(rec))
        if rec.id in held_ids or any(len(s & h) / max(1, len(s | h)) >= threshold for h in held):
            continue
        keep.append(rec)
    return keep


def _env_prefix() -> str:
    """The pretraining budget override, when the run used one (it names another base)."""
    steps = os.environ.get("FTFLOW_TINY_PRETRAIN_STEPS")
    return f"FTFLOW_TINY_PRETRAIN_STEPS={steps} " if steps else ""


def mean_tokens(records: list[Any], tokenizer: Any, max_length: int) -> float:
    lengths = []
    for rec in records:
        msgs = [m.model_dump() for m in rec.conversation()] if rec.messages else \
            [{"role": "user", "content": rec.text or ""}]
        ids = tokenizer.apply_chat_template(msgs, tokenize=False)
        lengths.append(min(max_length, len(tokenizer(ids, add_special_tokens=False)["input_ids"])))
    return sum(lengths) / max(1, len(lengths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=200_000, help="training token budget per side")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--eval-samples", type=int, default=200, help="held-out records scored")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ftflow-bench-curation"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "curation.md")
    ap.add_argument("--home", type=Path, help="ftflow home holding the pretrained base (default: "
                                              "WORKDIR/home; built there when missing)")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from benchmarks.bench_scale import write_corpus
    from data_contracts.config import (DedupConfig, EvaluateConfig, IngestConfig, PiiConfig,
                                       TrainConfig)
    from tasks.base_model import resolve_base_model
    from tasks.dedup import run_dedup
    from tasks.evaluate import PPL_TASK, run_evaluate
    from tasks.ingest import run_ingest
    from tasks.io import Quarantined, iter_input, read_records
    from tasks.pii import run_pii
    from tasks.stage_dir import StageWriter
    from tasks.train import run_train

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    home = args.home or work / "home"
    corpus = write_corpus(work / f"corpus-{args.records}-{args.seed}.jsonl", args.records,
                          args.seed)
    base = resolve_base_model("builtin:tiny-llama", home)
    t0 = time.time()

    # curated: the real stages
    cur = work / "curated"
    shutil.rmtree(cur, ignore_errors=True)
    ingest = run_ingest(str(corpus), cur / "01-ingest", IngestConfig(), home=home,
                        base_model="builtin:tiny-llama")
    pii = run_pii(cur / "01-ingest", cur / "02-pii", PiiConfig(), home=home)
    dedup = run_dedup(cur / "02-pii", cur / "03-dedup", DedupConfig(), home=home, seed=args.seed)
    heldout = list(read_records(cur / "03-dedup", "heldout"))
    curated_train = decontaminated(list(read_records(cur / "03-dedup", "train")), heldout)

    # raw: every parseable record, same decontamination against the same held-out split
    raw = [rec for rec in iter_input(str(corpus)) if not isinstance(rec, Quarantined)]
    raw_train = decontaminated(raw, heldout)

    tokenizer = AutoTokenizer.from_pretrained(base)
    sides: dict[str, dict[str, Any]] = {}
    for name, records in (("raw", raw_train), ("curated", curated_train)):
        data = work / f"{name}-data"
        shutil.rmtree(data, ignore_errors=True)
        writer = StageWriter(data, "dedup")
        for rec in records:
            writer.keep(rec, split="train")
        for rec in heldout:
            writer.keep(rec, split="heldout")
        writer.finish(len(records) + len(heldout), input_digests={}, config_digest=name)
        per_record = mean_tokens(records, tokenizer, 256)
        batch = 8
        steps = max(1, round(args.tokens / (batch * per_record)))
        cfg = TrainConfig(method="lora", max_steps=steps, learning_rate=1e-3, batch_size=batch,
                          max_length=256, warmup_ratio=0.05, eval_steps=steps, save_steps=steps,
                          logging_steps=10)
        started = time.time()
        tm = run_train(data, work / f"{name}-train", cfg, home=home, seed=0)
        train_s = time.time() - started
        em = run_evaluate(data, work / f"{name}-train", work / f"{name}-eval",
                          EvaluateConfig(max_samples=args.eval_samples, general_prose=64), home=home)
        sides[name] = {"records": len(records), "tokens_per_record": per_record, "steps": steps,
                       "train_tokens": tm.metrics.get("train_tokens"), "train_s": train_s,
                       "train_kept": tm.kept, "metrics": em.metrics, "gate": em.info["gate"]}
        print(name, json.dumps({k: v for k, v in sides[name].items() if k != "metrics"}),
              flush=True)

    rows = [(f"{PPL_TASK}.word_perplexity", "held-out chats, word perplexity (lower is better)"),
            (f"{PPL_TASK}.bits_per_byte", "held-out chats, bits per byte"),
            ("ftflow_heldout_mc.acc", "held-out chats, reply multiple-choice accuracy"),
            ("ftflow_general_prose.word_perplexity", "held-out prose (forgetting), word ppl")]
    lines = [
        "# Curation pays? Raw vs curated training data, same base and token budget", "",
        f"Command: `{_env_prefix()}nice .venv/bin/python benchmarks/bench_curation.py "
        f"--records {args.records} --eval-samples {args.eval_samples} "
        f"--tokens {args.tokens} --seed {args.seed}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()}, {os.cpu_count()} cores (shared), {time.time() - t0:.0f} s in all.",
        "", f"Corpus: bench_scale.py's corpus, {args.records} lines. Curated stages: ingest kept "
        f"{ingest.kept} (filtered {ingest.filtered_total}, quarantined {ingest.quarantined}), "
        f"PII kept {pii.kept}, dedup kept {dedup.kept} ({dedup.deduplicated} duplicates removed)"
        f"; {len(heldout)} held-out records (the evaluation set of both sides).", "",
        "| | raw | curated |", "|---|---:|---:|",
        f"| training records (after decontamination) | {sides['raw']['records']} | "
        f"{sides['curated']['records']} |",
        f"| mean tokens per record | {sides['raw']['tokens_per_record']:.1f} | "
        f"{sides['curated']['tokens_per_record']:.1f} |",
        f"| training steps (batch 8) | {sides['raw']['steps']} | {sides['curated']['steps']} |",
        f"| tokens trained (train manifest) | {sides['raw']['train_tokens']:.0f} | "
        f"{sides['curated']['train_tokens']:.0f} |",
        f"| base, held-out chats word ppl | {sides['raw']['metrics'][f'base.{PPL_TASK}.word_perplexity']:.2f} | "
        f"{sides['curated']['metrics'][f'base.{PPL_TASK}.word_perplexity']:.2f} |",
    ]
    for key, label in rows:
        vals = [sides[s]["metrics"].get(f"tuned.{key}") for s in ("raw", "curated")]
        errs = [sides[s]["metrics"].get(f"stderr.tuned.{key}") for s in ("raw", "curated")]
        cells = [f"{v:.4g}" + (f" ±{e:.2g}" if e is not None else "") if v is not None else "-"
                 for v, e in zip(vals, errs)]
        lines.append(f"| tuned: {label} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Gate, raw: {sides['raw']['gate']}", "",
              f"Gate, curated: {sides['curated']['gate']}", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
