"""The model card: base model, data lineage (each stage's input digests and ledger), config, the
base-vs-tuned table, the gate's decision, the formats and how to run them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from data_contracts.config import ExportConfig
from data_contracts.manifest import Manifest
from data_contracts.stage_outputs import EvaluateOutput, TrainOutput
from tasks.ledger import ledger_markdown, run_manifests

SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """A config with every value under a secret-looking key replaced (cards are shared)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) and isinstance(v, str) and v
                    and not k.endswith(("_env", "_tokens")) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def lineage_table(manifests: dict[str, Manifest]) -> str:
    """Each stage's inputs (name: sha256 prefix), config digest and started-at time."""
    lines = ["| stage | inputs (sha256) | config | started |", "|---|---|---|---|"]
    for name, m in manifests.items():
        inputs = "<br>".join(f"`{Path(k).name}`: `{v[:12]}`" for k, v in
                             sorted(m.input_digests.items())) or "-"
        lines.append(f"| {name} | {inputs} | `{m.config_digest[:12] or '-'}` | "
                     f"{m.started_at or '-'} |")
    return "\n".join(lines)


def _lora_summary(adapter_dir: Path) -> str:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        return "-"
    cfg = json.loads(cfg_file.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # peft saves a set: any order
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora")
    return ", ".join(f"{k}={cfg.get(k)}" for k in keys if k in cfg)


def _metrics_line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "no metrics recorded"


def comparison_table(eval_dir: Path) -> str:
    """The evaluate stage's base-vs-tuned table (comparison.md's table rows only)."""
    path = eval_dir / "comparison.md"
    if not path.exists():
        return ""
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("|"))


def model_card(train_manifest: Manifest, train: TrainOutput, evaluation: EvaluateOutput,
               eval_dir: Path, run_dir: Path, cfg: ExportConfig,
               run_config: dict[str, Any] | None, formats: str) -> str:
    """The card's markdown (the registry section is appended once the version is known)."""
    manifests = run_manifests(run_dir)
    ledger = (ledger_markdown(manifests) if manifests
              else "No stage directories were found beside the train dir.")
    lineage = lineage_table(manifests) if manifests else "-"
    config = (yaml.safe_dump(redact(run_config), sort_keys=False) if run_config
              else yaml.safe_dump({"export": cfg.model_dump(mode="json")}, sort_keys=False))
    demo = "builtin:" in train.base_model or "tiny-llama" in train.base_model
    limits = ("The base is the built-in tiny demo model, trained on a few MB of text: this model "
              "is for pipeline tests and demos, not for use." if demo else
              "Evaluated on the held-out split of its own data and the configured general "
              "tasks only: that says nothing about safety, factuality or other domains. Review "
              "generations before any production use.")
    return f"""# {cfg.model_name}

A fine-tune produced by the ftflow pipeline.

## Model
- Base model: `{train.base_model}`
- Method: {train.method} (quantized during training: {train.quantized})
- LoRA: {_lora_summary(Path(train.adapter_dir))}

## Training
- Records: {train_manifest.records_in} in, {train_manifest.kept} used; \
{_metrics_line(train_manifest.metrics)}

## Evaluation: base vs tuned
{comparison_table(eval_dir) or "No comparison available."}

**Gate decision:** {"passed" if evaluation.gate_passed else "failed"}: {evaluation.gate}

## Data lineage
Every stage's inputs with their sha256 digests, and its config digest:

{lineage}

Ledger (where every record went):

{ledger}

## Formats
{formats}

## Intended use and limitations
Intended use: chat replies in the domain of the training conversations. {limits}

## How to use
```python
import mlflow
model = mlflow.pyfunc.load_model("models:/{cfg.model_name}@champion")  # or @candidate
model.predict([[{{"role": "user", "content": "Hello!"}}]])  # -> ["..."]; prompts work too
```

## Config
```yaml
{config.rstrip()}
```
"""
