"""Stage 6: benchmark base vs tuned on the held-out split with lm-eval, and gate promotion.

Two lm-eval tasks are built from the held-out records, rendered with the tuned model's chat
template: ``ftflow_heldout_ppl`` (``loglikelihood_rolling`` over whole conversations:
word/byte perplexity, bits per byte) and ``ftflow_heldout_mc`` (``multiple_choice``: the true
final reply among distractor replies of other held-out records: acc, acc_norm). Both models
run through lm-eval's own ``hf`` model in this stage; the gate compares one metric.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import yaml

from data_contracts.config import EvaluateConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from data_contracts.stage_outputs import EvaluateOutput, TrainOutput, read_output
from tasks.io import read_records
from tasks.stage_dir import StageDir, write_atomic

log = logging.getLogger(__name__)

PPL_TASK = "ftflow_heldout_ppl"
MC_TASK = "ftflow_heldout_mc"
HF_CACHE = ".hf-datasets-cache"


def lower_is_better(metric: str) -> bool:
    """Perplexities and bits per byte fall as a model improves; accuracies rise."""
    return "perplexity" in metric or "bits_per_byte" in metric


def _metric_entry(name: str, aggregation: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": not lower_is_better(name)}


def _task_yaml(name: str, data_file: Path, cache_dir: Path, **fields: Any) -> dict[str, Any]:
    return {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test", **fields, "metadata": {"version": 1.0},
    }


def _render(tokenizer: Any, messages: list[dict[str, str]], prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def mc_items(records: list[ChatSample], tokenizer: Any, num_choices: int,
             seed: int) -> list[dict[str, Any]]:
    """Context up to the last reply, the true reply among distractors from other records.

    A preference pair's rejected reply is always among its distractors: the tuned model
    should prefer the chosen one.
    """
    convs = {r.id: r.conversation() for r in records}
    chats = [r for r in records if convs[r.id] and convs[r.id][-1].role == "assistant"]
    items = []
    for rec in chats:
        conv = convs[rec.id]
        truth = conv[-1].content
        pool = sorted({convs[r.id][-1].content for r in chats} - {truth})
        rng = random.Random(f"{seed}:{rec.id}")
        hard = [rec.rejected] if rec.rejected is not None and rec.rejected != truth else []
        pool = [p for p in pool if p not in hard]
        choices = [truth, *hard]
        choices += rng.sample(pool, min(num_choices - len(choices), len(pool)))
        if len(choices) < 2:
            continue
        rng.shuffle(choices)
        context = _render(tokenizer, [m.model_dump() for m in conv[:-1]], prompt=True)
        items.append({"id": rec.id, "context": context, "choices": choices,
                      "label": choices.index(truth)})
    return items


def write_tasks(records: list[ChatSample], tokenizer: Any, tasks_dir: Path,
                cfg: EvaluateConfig) -> list[str]:
    """Write the task YAMLs and their JSONL data files; return the task names to run."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    cache = tasks_dir / HF_CACHE
    ppl_rows = [{"id": r.id, "text": _render(tokenizer, [m.model_dump() for m in r.conversation()])
                 if r.messages else (r.text or "")} for r in records]
    mc_rows = mc_items(records, tokenizer, cfg.num_choices, cfg.seed)
    specs = {
        PPL_TASK: (ppl_rows, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [_metric_entry("word_perplexity", "weighted_perplexity"),
                            _metric_entry("byte_perplexity", "weighted_perplexity"),
                            _metric_entry("bits_per_byte", "bits_per_byte")]}),
        MC_TASK: (mc_rows, {
            # The context ends with the generation prompt, so the reply follows directly.
            "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [_metric_entry("acc", "mean"), _metric_entry("acc_norm", "mean")]}),
    }
    names = []
    for name, (rows, fields) in specs.items():
        if not rows:
            log.warning("%s: no usable held-out records, task skipped", name)
            continue
        data_file = tasks_dir / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        spec = _task_yaml(name, data_file, cache, **fields)
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(name)
    return names


def evaluate_model(model: str, tasks: list[str], tasks_dir: Path,
                   cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """lm-eval on one model: {task: {metric: value}} without stderr and filter suffixes."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    out = simple_evaluate(
        model="hf", model_args={"pretrained": model, "trust_remote_code": False},
        tasks=tasks, task_manager=manager, batch_size=cfg.batch_size, device=_device(cfg.device),
        log_samples=False, bootstrap_iters=0, random_seed=cfg.seed,
        numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
    )
    results: dict[str, dict[str, float]] = {}
    for name, values in (out or {}).get("results", {}).items():
        results[name] = {key.split(",")[0]: float(v) for key, v in values.items()
                         if "," in key and "_stderr" not in key and isinstance(v, (int, float))}
    return results


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gate(base: dict[str, dict[str, float]], tuned: dict[str, dict[str, float]],
         metric: str, min_improvement: float) -> tuple[bool, float, str]:
    """Did the tuned model beat base on `task.metric` by at least min_improvement (relative)?"""
    task_name, name = metric.split(".", 1)
    b, t = base.get(task_name, {}).get(name), tuned.get(task_name, {}).get(name)
    if b is None or t is None or not (math.isfinite(b) and math.isfinite(t)):
        return False, float("nan"), f"gate failed: {metric} missing or not finite (base {b}, tuned {t})"
    lower = lower_is_better(name)
    gain = (b - t) if lower else (t - b)
    rel = gain / abs(b) if b else (math.inf if gain > 0 else 0.0)
    passed = gain > 0 and rel >= min_improvement
    direction = "lower" if lower else "higher"
    text = (f"gate {'passed' if passed else 'failed'}: {metric} ({direction} is better) base "
            f"{b:.4g} -> tuned {t:.4g}, relative improvement {rel:+.2%} "
            f"(needed > 0 and >= {min_improvement:.2%})")
    return passed, rel, text


def comparison_table(base: dict[str, dict[str, float]],
                     tuned: dict[str, dict[str, float]]) -> str:
    """A markdown table: task, metric, base, tuned, delta (and which direction is better)."""
    lines = ["| task | metric | base | tuned | delta | better |", "|---|---|---|---|---|---|"]
    for task_name in sorted(set(base) | set(tuned)):
        for name in sorted(set(base.get(task_name, {})) | set(tuned.get(task_name, {}))):
            b, t = base.get(task_name, {}).get(name), tuned.get(task_name, {}).get(name)
            delta = f"{t - b:+.4g}" if b is not None and t is not None else "-"
            lines.append(f"| {task_name} | {name} | {_fmt(b)} | {_fmt(t)} | {delta} | "
                         f"{'lower' if lower_is_better(name) else 'higher'} |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def run_evaluate(data_dir: str | Path, train_dir: str | Path, out_dir: str | Path,
                 cfg: EvaluateConfig, *, home: str | Path) -> Manifest:
    """Benchmark the base and the tuned model on held-out data; decide the promotion gate."""
    from transformers import AutoTokenizer

    stage = StageDir(out_dir, "evaluate", cfg.digest(), data_dir, train_dir)
    if (done := stage.finished()) is not None:
        return done
    out = Path(out_dir)
    _, train = read_output(train_dir, TrainOutput)
    writer = stage.writer()
    records = []
    for rec in read_records(data_dir, "heldout"):
        if len(records) >= cfg.max_samples:
            break
        records.append(rec)
    if not records:
        raise ValueError(f"{data_dir}: no held-out records to evaluate on "
                         "(is dedup.eval_fraction > 0?)")
    tokenizer = AutoTokenizer.from_pretrained(train.merged_dir)
    tasks_dir = out / "tasks"
    shutil.rmtree(tasks_dir, ignore_errors=True)
    names = write_tasks(records, tokenizer, tasks_dir, cfg)
    models = {"base": train.base_model, "tuned": train.merged_dir}
    results = {}
    for label, model in models.items():
        log.info("evaluate %s model %s on %s", label, model, names)
        results[label] = evaluate_model(model, names, tasks_dir, cfg)
    shutil.rmtree(tasks_dir / HF_CACHE, ignore_errors=True)
    passed, rel, text = gate(results["base"], results["tuned"], cfg.gate_metric,
                             cfg.gate_min_improvement)
    log.info(text)
    results_file, comparison_file = out / "results.json", out / "comparison.md"
    write_atomic(results_file, json.dumps({"models": models, **results}, indent=2) + "\n")
    table = comparison_table(results["base"], results["tuned"])
    write_atomic(comparison_file,
                 f"# Base vs tuned on {len(records)} held-out records\n\n{table}\n\n{text}\n")
    for rec in records:
        writer.keep(rec, split="heldout")
    metrics = {f"{label}.{t}.{k}": v for label, res in results.items()
               for t, vals in res.items() for k, v in vals.items() if math.isfinite(v)}
    metrics["gate.passed"] = float(passed)
    if math.isfinite(rel):  # JSON has no NaN/inf: the manifest would not read back
        metrics["gate.relative_improvement"] = rel
    output = EvaluateOutput(gate_passed=passed, gate=text, gate_metric=cfg.gate_metric,
                            results=str(results_file), comparison=str(comparison_file))
    return writer.finish(len(records), metrics=metrics, output=output,
                         info={"tasks": names, "models": models},
                         outputs=[results_file, comparison_file])
