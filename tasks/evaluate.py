"""Stage 6: benchmark base vs tuned with lm-eval, and decide the release gate.

Tasks built here: ``ftflow_heldout_ppl`` (``loglikelihood_rolling`` over whole held-out
conversations: word/byte perplexity, bits per byte) and ``ftflow_heldout_mc``
(``multiple_choice``: the true final reply among distractors) are the *target* tasks;
``ftflow_general_prose`` (held-out passages of the builtin base's pretraining prose) and any
lm-eval tasks the config names (when their data is available offline) are the *general* tasks.
The gate passes when every target metric gains at least ``min_gain`` and no general task loses
more than ``max_regression`` (both relative). An optional LLM judge compares replies
(``tasks/judge.py``). Both models run through lm-eval's own ``hf`` model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from data_contracts.config import EvaluateConfig, TeacherConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from data_contracts.stage_outputs import EvaluateOutput, TrainOutput, read_output
from tasks.base_model import general_heldout_texts
from tasks.io import read_records
from tasks.stage_dir import StageDir, write_atomic

log = logging.getLogger(__name__)

PPL_TASK = "ftflow_heldout_ppl"
MC_TASK = "ftflow_heldout_mc"
PROSE_TASK = "ftflow_general_prose"
MC_METRICS = ("acc", "acc_norm", "acc_mutual_info")
PROSE_METRIC = "bits_per_byte"  # log scale: word perplexity magnifies small shifts
HF_CACHE = ".hf-datasets-cache"
# The metric a general lm-eval task is judged on when the config names only the task.
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1", "word_perplexity", "bits_per_byte")

Scores = dict[str, dict[str, float]]  # {task: {metric: value, "metric_stderr": value}}


def lower_is_better(metric: str) -> bool:
    """Perplexities and bits per byte fall as a model improves; accuracies rise."""
    return "perplexity" in metric or "bits_per_byte" in metric


def in_points(metric: str) -> bool:
    """Accuracies are compared in absolute points: a relative gain over a base at or near
    chance (0.2 -> 0.3 is "+50%") says little."""
    return metric.startswith("acc") or metric in ("exact_match", "f1", "mcc")


def format_change(metric: str, change: float) -> str:
    """A gate change as the gate reads it: points for accuracies, else relative."""
    return f"{change * 100:+.1f} pts" if in_points(metric) else f"{change:+.1%}"


def _metric_entry(name: str, aggregation: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": not lower_is_better(name)}


PPL_METRICS = [_metric_entry("word_perplexity", "weighted_perplexity"),
               _metric_entry("byte_perplexity", "weighted_perplexity"),
               _metric_entry("bits_per_byte", "bits_per_byte")]


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
        context = _render(tokenizer, [m.model_dump() for m in conv[:-1]])
        items.append({"id": rec.id, "context": context, "choices": choices,
                      "label": choices.index(truth)})
    return items


def generation_prompt(tokenizer: Any) -> str:
    """What the chat template appends to open the assistant's turn ("<|im_start|>assistant\\n"):
    the multiple-choice task's target delimiter, between the conversation and each reply."""
    turn = [{"role": "user", "content": "x"}]
    bare, opened = _render(tokenizer, turn), _render(tokenizer, turn, prompt=True)
    if not opened.startswith(bare):
        raise ValueError("the chat template's generation prompt is not a suffix of the chat")
    return opened[len(bare):]


def write_tasks(records: list[ChatSample], tokenizer: Any, tasks_dir: Path,
                cfg: EvaluateConfig) -> list[str]:
    """Write the task YAMLs and their JSONL data files; return the task names to run."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    cache = tasks_dir / HF_CACHE
    ppl_rows = [{"id": r.id, "text": _render(tokenizer, [m.model_dump() for m in r.conversation()])
                 if r.messages else (r.text or "")} for r in records]
    mc_rows = mc_items(records, tokenizer, cfg.num_choices, cfg.seed)
    prose_rows = general_heldout_texts(cfg.general_prose, cfg.seed) if cfg.general_prose else []
    rolling = {"output_type": "loglikelihood_rolling", "doc_to_text": "",
               "doc_to_target": "text", "metric_list": PPL_METRICS}
    specs = {
        PPL_TASK: (ppl_rows, rolling),
        MC_TASK: (mc_rows, {
            # Each reply follows the generation prompt (the delimiter). acc_mutual_info makes
            # lm-eval also score every reply after the delimiter alone, with no conversation,
            # and picks by loglik(reply | chat) - loglik(reply | no chat): whether the reply
            # belongs to this chat, not whether it is a likely reply at all.
            "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label",
            "target_delimiter": generation_prompt(tokenizer),
            "metric_list": [_metric_entry(m, "mean") for m in MC_METRICS]}),
        PROSE_TASK: (prose_rows, rolling),
    }
    names = []
    for name, (rows, fields) in specs.items():
        if not rows:
            if name != PROSE_TASK or cfg.general_prose:
                log.warning("%s: no usable records, task skipped", name)
            continue
        data_file = tasks_dir / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        spec = _task_yaml(name, data_file, cache, **fields)
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(name)
    return names


def _task_manager(tasks_dir: Path, cfg: EvaluateConfig) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [str(tasks_dir)] + ([cfg.lm_eval_include_path] if cfg.lm_eval_include_path else [])
    return TaskManager(include_path=paths, include_defaults=bool(cfg.lm_eval_tasks))


def _offline() -> bool:
    import datasets.config
    import huggingface_hub.constants

    return bool(datasets.config.HF_DATASETS_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


def available_lm_eval_tasks(names: list[str], manager: Any) -> tuple[list[str], dict[str, str]]:
    """The named lm-eval tasks whose data loads offline, and {task: why skipped} for the rest.

    Loading a task loads its dataset; in offline mode a dataset that is not in the local
    cache fails at once instead of downloading. Out of offline mode nothing is tried: ftflow
    never downloads a dataset at run time.
    """
    ok, skipped = [], {}
    for entry in names:
        task = entry.split(".", 1)[0]
        if task not in manager.all_tasks:
            skipped[entry] = "not an lm-eval task name (nor in evaluate.lm_eval_include_path)"
            continue
        if not _offline():
            skipped[entry] = ("not in offline mode (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE unset): "
                              "ftflow never downloads datasets")
            continue
        try:
            manager.load_task_or_group([task])
        except Exception as err:  # noqa: BLE001 - any failure to load means: not available
            skipped[entry] = (f"its data is not available offline "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            continue
        ok.append(entry)
    return ok, skipped


def evaluate_model(model: str, tasks: list[str], manager: Any, cfg: EvaluateConfig) -> Scores:
    """lm-eval on one model: {task: {metric: value, metric_stderr: value}}, filters dropped."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf", model_args={"pretrained": model, "trust_remote_code": False},
        tasks=tasks, task_manager=manager, batch_size=cfg.batch_size, device=_device(cfg.device),
        log_samples=True, bootstrap_iters=100, random_seed=cfg.seed, limit=cfg.lm_eval_limit,
        numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
    )
    results: Scores = {}
    for name, values in (out or {}).get("results", {}).items():
        results[name] = {key.split(",")[0]: float(v) for key, v in values.items()
                         if "," in key and isinstance(v, (int, float))}
        # lm-eval gives no stderr for perplexities and bits per byte: bootstrap them here.
        for metric in list(results[name]):
            if metric in WEIGHTED and f"{metric}_stderr" not in results[name]:
                err = bootstrap_stderr((out or {}).get("samples", {}).get(name, []), metric,
                                       cfg.seed)
                if err is not None:
                    results[name][f"{metric}_stderr"] = err
    return results


# Corpus-level metrics lm-eval aggregates from per-document (loglikelihood, words or bytes).
WEIGHTED = {"word_perplexity": lambda m: math.exp(-m), "byte_perplexity": lambda m: math.exp(-m),
            "bits_per_byte": lambda m: -m / math.log(2)}


def bootstrap_stderr(samples: list[dict[str, Any]], metric: str, seed: int,
                     iters: int = 200) -> float | None:
    """Standard error of a corpus-level metric: its spread over documents resampled with
    replacement (seeded)."""
    pairs = [tuple(s[metric]) for s in samples
             if isinstance(s.get(metric), (list, tuple)) and len(s[metric]) == 2]
    if len(pairs) < 2:
        return None
    rng, n, finish = random.Random(seed), len(pairs), WEIGHTED[metric]
    values = []
    for _ in range(iters):
        draw = [pairs[rng.randrange(n)] for _ in range(n)]
        values.append(finish(sum(p[0] for p in draw) / max(sum(p[1] for p in draw), 1)))
    mean = sum(values) / iters
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (iters - 1))


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Check:
    """One line of the gate: a metric of base and tuned, and whether it meets its bound."""

    kind: str  # "target" (must gain min_gain) or "general" (may lose max_regression at most)
    task: str
    metric: str
    base: float | None
    tuned: float | None
    base_stderr: float | None
    tuned_stderr: float | None
    # positive = tuned is better; absolute points for accuracies, else relative to the base
    # (nan when a value is missing)
    change: float
    bound: float  # target: the gain needed; general: the loss allowed (same units as change)
    passed: bool
    # accuracy target: the gain must also reach min_stderrs standard errors of the difference,
    # sqrt(base_stderr^2 + tuned_stderr^2) (0: not asked; not applied when a stderr is missing)
    min_stderrs: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.task}.{self.metric}"

    @property
    def diff_stderr(self) -> float | None:
        errs = (self.base_stderr, self.tuned_stderr)
        if any(e is None or not math.isfinite(e) for e in errs):
            return None
        return math.hypot(*errs)  # type: ignore[arg-type]

    def describe(self) -> str:
        direction = "lower" if lower_is_better(self.metric) else "higher"
        if self.base is None or self.tuned is None or not math.isfinite(self.change):
            return f"{self.kind} {self.name}: missing or not finite (base {self.base}, tuned " \
                   f"{self.tuned})"
        need = (f"needed >= {format_change(self.metric, self.bound)}" if self.kind == "target"
                else f"allowed >= {format_change(self.metric, -self.bound)}")
        if self.kind == "target" and self.min_stderrs and self.diff_stderr is not None:
            need += f" and >= {self.min_stderrs:g} stderr of the difference ({self.diff_stderr:.2g})"
        return (f"{self.kind} {self.name} ({direction} is better) {_pm(self.base, self.base_stderr)}"
                f" -> {_pm(self.tuned, self.tuned_stderr)}: {format_change(self.metric, self.change)}"
                f" ({need})")


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4g}" + (f"±{stderr:.2g}" if stderr is not None and math.isfinite(stderr)
                             else "")


def primary_metric(entry: str, scores: dict[str, float]) -> str:
    """``task.metric`` names its metric; a bare task name is judged on its primary metric."""
    if "." in entry:
        return entry.split(".", 1)[1]
    for name in PRIMARY_METRICS:
        if name in scores:
            return name
    return next((k for k in sorted(scores) if not k.endswith("_stderr")), "")


def check(kind: str, task: str, metric: str, base: Scores, tuned: Scores,
          bound: float, min_stderrs: float = 0.0) -> Check:
    """Compare one metric of base and tuned against its bound: the change is in absolute
    points for accuracies, relative to the base for the rest. An accuracy target must also gain
    at least min_stderrs standard errors of the difference, when both stderrs are known."""
    b, t = base.get(task, {}).get(metric), tuned.get(task, {}).get(metric)
    bs, ts = (base.get(task, {}).get(f"{metric}_stderr"),
              tuned.get(task, {}).get(f"{metric}_stderr"))
    # Only accuracies: a word perplexity's bootstrap stderr over a few documents is on an
    # exponential scale and unpaired (base and tuned score the same documents), so it would
    # fail a fine-tune that improves every single document.
    z = min_stderrs if kind == "target" and in_points(metric) else 0.0
    if b is None or t is None or not (math.isfinite(b) and math.isfinite(t)):
        return Check(kind, task, metric, b, t, bs, ts, math.nan, bound, False, z)
    gain = (b - t) if lower_is_better(metric) else (t - b)
    if in_points(metric):
        change = gain
    else:
        change = gain / abs(b) if b else (math.inf if gain > 0 else 0.0 if gain == 0
                                          else -math.inf)
    eps = 1e-9  # 0.5 - 0.4 is 0.0999...: a gain of exactly the bound meets it
    passed = change >= bound - eps if kind == "target" else change >= -bound - eps
    result = Check(kind, task, metric, b, t, bs, ts, change, bound, passed, z)
    if kind == "target":
        noise = result.diff_stderr
        result.passed = passed and gain > 0 and (noise is None or gain >= z * noise - eps)
    return result


def gate_checks(base: Scores, tuned: Scores, cfg: EvaluateConfig,
                general: list[str]) -> list[Check]:
    """Every target metric against min_gain, every general task against max_regression."""
    checks = []
    for metric in cfg.targets:
        task, name = metric.split(".", 1)
        checks.append(check("target", task, name, base, tuned, cfg.min_gain,
                            cfg.min_gain_stderrs))
    for entry in general:
        task = entry.split(".", 1)[0]
        name = PROSE_METRIC if task == PROSE_TASK and "." not in entry else \
            primary_metric(entry, base.get(task, {}))
        checks.append(check("general", task, name, base, tuned, cfg.max_regression))
    return checks


def decide(checks: list[Check], judge: dict[str, Any] | None = None,
           min_win_rate: float | None = None) -> tuple[bool, str]:
    """The gate's decision and its reason in one line (failures first, else every check)."""
    failed = [c for c in checks if not c.passed]
    judged = judge is not None and min_win_rate is not None
    judge_ok = not judged or judge["win_rate"] >= min_win_rate  # type: ignore[index]
    passed = not failed and judge_ok and any(c.kind == "target" for c in checks)
    if passed:
        text = "gate passed: " + "; ".join(c.describe() for c in checks)
    else:
        why = [("regressed: " if c.kind == "general" else "did not gain enough: ") + c.describe()
               for c in failed]
        if not judge_ok:
            why.append(f"judge win rate {judge['win_rate']:.1%} below "  # type: ignore[index]
                       f"{min_win_rate:.1%}")
        text = "gate failed: " + "; ".join(why or ["no target metric"])
    if judge is not None:
        text += f"; judge win rate {judge['win_rate']:.1%} over {judge['judgments']} judgments"
    return passed, text


def comparison_table(checks: list[Check], base: Scores, tuned: Scores) -> str:
    """A markdown table: every metric of every task, base and tuned with stderr, the delta,
    which direction is better and the gate's role (target / general / -)."""
    roles = {(c.task, c.metric): c.kind for c in checks}
    lines = ["| task | metric | base | tuned | delta | better | gate |",
             "|---|---|---|---|---|---|---|"]
    for task in sorted(set(base) | set(tuned)):
        metrics = set(base.get(task, {})) | set(tuned.get(task, {}))
        for name in sorted(m for m in metrics if not m.endswith("_stderr")):
            b, t = base.get(task, {}).get(name), tuned.get(task, {}).get(name)
            delta = f"{t - b:+.4g}" if b is not None and t is not None else "-"
            bs, ts = (base.get(task, {}).get(f"{name}_stderr"),
                      tuned.get(task, {}).get(f"{name}_stderr"))
            lines.append(f"| {task} | {name} | {_cell(b, bs)} | {_cell(t, ts)} | {delta} | "
                         f"{'lower' if lower_is_better(name) else 'higher'} | "
                         f"{roles.get((task, name), '-')} |")
    return "\n".join(lines)


def _cell(v: float | None, stderr: float | None) -> str:
    return "-" if v is None else _pm(v, stderr)


def _flat_metrics(results: dict[str, Scores], checks: list[Check]) -> dict[str, float]:
    """Manifest/MLflow metrics: ``base.TASK.METRIC`` (and ``stderr.base...``) and the gate's."""
    metrics = {}
    for label, res in results.items():
        for task, vals in res.items():
            for key, v in vals.items():
                if math.isfinite(v):  # JSON has no NaN/inf: the manifest would not read back
                    name = (f"stderr.{label}.{task}.{key[:-len('_stderr')]}"
                            if key.endswith("_stderr") else f"{label}.{task}.{key}")
                    metrics[name] = v
    for c in checks:
        if math.isfinite(c.change):
            metrics[f"gate.{c.kind}.{c.name}.change"] = c.change
    return metrics


def run_evaluate(data_dir: str | Path, train_dir: str | Path, out_dir: str | Path,
                 cfg: EvaluateConfig, *, home: str | Path,
                 judge_teacher: TeacherConfig | None = None) -> Manifest:
    """Benchmark the base and the tuned model; decide the release gate."""
    from transformers import AutoTokenizer

    # The judge's endpoint may come from augment.teacher: part of what this stage depends on.
    digest = cfg.digest() + (f"+{judge_teacher.digest()}" if cfg.judge.enabled and
                             judge_teacher is not None and cfg.judge.teacher is None else "")
    stage = StageDir(out_dir, "evaluate", digest, data_dir, train_dir)
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
    manager = _task_manager(tasks_dir, cfg)
    extra, skipped = available_lm_eval_tasks(cfg.lm_eval_tasks, manager)
    for entry, why in skipped.items():
        log.warning("lm-eval task %s skipped: %s", entry, why)
    run_names = names + sorted({e.split(".", 1)[0] for e in extra})
    models = {"base": train.base_model, "tuned": train.merged_dir}
    results = {}
    for label, model in models.items():
        log.info("evaluate %s model %s on %s", label, model, run_names)
        results[label] = evaluate_model(model, run_names, manager, cfg)
    shutil.rmtree(tasks_dir / HF_CACHE, ignore_errors=True)
    general = ([PROSE_TASK] if PROSE_TASK in names else []) + extra
    checks = gate_checks(results["base"], results["tuned"], cfg, general)
    judge = None
    if cfg.judge.enabled:
        from tasks.judge import judge_models

        judge = judge_models(models, records, tokenizer, cfg.judge,
                             cfg.judge.teacher or judge_teacher or TeacherConfig(),
                             out / "judgments.jsonl", _device(cfg.device))
    passed, text = decide(checks, judge, cfg.judge.min_win_rate)
    log.info(text)
    results_file, comparison_file = out / "results.json", out / "comparison.md"
    write_atomic(results_file, json.dumps(
        {"models": models, **results, "gate": {"passed": passed, "reason": text,
                                               "checks": [asdict(c) for c in checks]},
         "skipped_tasks": skipped, "judge": judge}, indent=2) + "\n")
    write_atomic(comparison_file, comparison_markdown(len(records), checks, results, skipped,
                                                      judge, text))
    for rec in records:
        writer.keep(rec, split="heldout")
    metrics = _flat_metrics(results, checks)
    metrics["gate.passed"] = float(passed)
    if judge is not None:
        metrics.update({f"judge.{k}": float(judge[k]) for k in
                        ("win_rate", "wins", "losses", "ties", "judgments")})
    first = checks[0]
    output = EvaluateOutput(
        gate_passed=passed, gate=text, gate_metric=cfg.gate_metric, results=str(results_file),
        comparison=str(comparison_file), higher_is_better=not lower_is_better(first.metric),
        target_score=first.tuned if first.tuned is not None and math.isfinite(first.tuned)
        else None)
    tags = {"gate.decision": "passed" if passed else "failed", "gate.reason": text[:5000]}
    outputs = [results_file, comparison_file] + ([out / "judgments.jsonl"] if judge else [])
    return writer.finish(len(records), metrics=metrics, output=output,
                         info={"tasks": run_names, "models": models, "skipped_tasks": skipped,
                               "mlflow_tags": tags}, outputs=outputs)


def comparison_markdown(n_records: int, checks: list[Check], results: dict[str, Scores],
                        skipped: dict[str, str], judge: dict[str, Any] | None, text: str) -> str:
    """comparison.md: the gate's decision, its checks, every score, skipped tasks, the judge."""
    lines = [f"# Base vs tuned ({n_records} held-out records)", "", f"**{text}**", "",
             "## Gate checks", "", "| kind | task.metric | base | tuned | change | bound | ok |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        change = format_change(c.metric, c.change) if math.isfinite(c.change) else "-"
        bound = (f">= {format_change(c.metric, c.bound)}" if c.kind == "target"
                 else f">= {format_change(c.metric, -c.bound)}")
        if c.kind == "target" and c.min_stderrs and c.diff_stderr is not None:
            bound += f", >= {c.min_stderrs:g}x{c.diff_stderr:.2g}"
        lines.append(f"| {c.kind} | {c.name} | {_cell(c.base, c.base_stderr)} | "
                     f"{_cell(c.tuned, c.tuned_stderr)} | {change} | {bound} | "
                     f"{'yes' if c.passed else 'NO'} |")
    lines += ["", "## Every score (± stderr)", "",
              comparison_table(checks, results["base"], results["tuned"]), ""]
    if skipped:
        lines += ["## Skipped lm-eval tasks", ""]
        lines += [f"- `{name}`: {why}" for name, why in skipped.items()] + [""]
    if judge is not None:
        lines += ["## LLM judge", "", f"Tuned vs base win rate {judge['win_rate']:.1%}: "
                  f"{judge['wins']} wins, {judge['losses']} losses, {judge['ties']} ties over "
                  f"{judge['judgments']} judgments ({judge['prompts']} prompts, each judged "
                  f"twice with the replies swapped) by `{judge['judge']}`.", ""]
    return "\n".join(lines)

