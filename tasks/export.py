"""Stage 7: log the tuned model to MLflow as a chat pyfunc with a model card, and register it.

The logged model holds the LoRA adapter and the merged model (safetensors) as artifacts and
``README.md`` (the model card). Its ``predict`` takes chats (lists of messages) or prompts and
returns replies generated through the saved chat template. Registration (version, alias, tags)
happens only when the evaluate gate passed, unless ``register_if_gate_fails``.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent active-run
stack or the global tracking URI, so the caller's MLflow state is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from data_contracts.config import ExportConfig
from data_contracts.manifest import Manifest
from data_contracts.stage_outputs import EvaluateOutput, ExportOutput, TrainOutput, read_output
from tasks.stage_dir import StageDir, write_atomic
from tasks.tracking import ensure_experiment

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
CARD_NAME = "MODEL_CARD.md"


def as_chats(model_input: Any) -> list[list[dict[str, str]]]:
    """Normalise pyfunc input (prompts, chats, {"messages"} dicts, a DataFrame) to chats."""
    if hasattr(model_input, "to_dict"):  # pandas DataFrame, as the REST server sends it
        column = "messages" if "messages" in model_input.columns else model_input.columns[0]
        model_input = list(model_input[column])
    if isinstance(model_input, (str, dict)):
        model_input = [model_input]
    chats = []
    for item in model_input:
        if isinstance(item, str):
            chats.append([{"role": "user", "content": item}])
        elif isinstance(item, dict):
            chats.append(list(item["messages"]) if "messages" in item else [item])
        else:
            chats.append([dict(m) for m in item])
    return chats


class ChatModel(PythonModel):
    """Serves the merged model: one generated assistant reply per chat or prompt."""

    def load_context(self, context: PythonModelContext) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["merged"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.model.eval()
        self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", 64))

    def predict(self, context: PythonModelContext, model_input: list[Any],
                params: dict[str, Any] | None = None) -> list[str]:
        import torch

        replies = []
        for chat in as_chats(model_input):
            ids = self.tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = self.model.generate(
                    **ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            new_tokens = out[0, ids["input_ids"].shape[1]:]
            replies.append(self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        return replies


@contextmanager
def _pickled_by_value() -> Iterator[None]:
    """Pickle ChatModel with its code, so loading the model does not need ftflow installed."""
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _ledger_table(run_dir: Path) -> str:
    """The ledger of every stage dir beside the train dir (a pipeline run), if there are any."""
    rows = ["| stage | in | generated | kept | filtered | deduplicated | quarantined |",
            "|---|---|---|---|---|---|---|"]
    for path in sorted(run_dir.glob("*/manifest.json")):
        m = Manifest.read(path.parent)
        if m.records_in or m.kept:
            rows.append(f"| {path.parent.name} | {m.records_in} | {m.generated} | {m.kept} | "
                        f"{m.filtered_total} | {m.deduplicated} | {m.quarantined} |")
    return "\n".join(rows) if len(rows) > 2 else "No data ledger was found beside the train dir."


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


def model_card(train_manifest: Manifest, train: TrainOutput, evaluation: EvaluateOutput,
               comparison: str, ledger: str, cfg: ExportConfig) -> str:
    """The model card: provenance, training setup, data ledger, base-vs-tuned results, limits."""
    gate = evaluation.gate
    demo = "tiny-llama" in train.base_model
    limits = ("The base is the built-in randomly initialised tiny demo model: the outputs are not "
              "meaningful and this model must not be used for anything but pipeline tests."
              if demo else
              "Evaluated only on the held-out split of its own data (perplexity and a "
              "reply-selection task): that says nothing about safety, factuality or other "
              "domains. Review generations before any production use.")
    return f"""# {cfg.model_name}

A fine-tune produced by the ftflow pipeline. Registry: `models:/{cfg.model_name}@{cfg.alias}`
(only when the promotion gate passed or `register_if_gate_fails` is set).

## Model
- Base model: `{train.base_model}`
- Method: {train.method} (quantized during training: {train.quantized})
- LoRA: {_lora_summary(Path(train.adapter_dir))}
- Artifacts: `artifacts/adapter` (peft LoRA adapter), `artifacts/merged` (merged model),
  both safetensors with the tokenizer and its chat template.

## Training
- Records: {train_manifest.records_in} in, {train_manifest.kept} used; \
{_metrics_line(train_manifest.metrics)}

## Data ledger
{ledger}

## Evaluation: base vs tuned
{comparison.strip() or "No comparison available."}

**Promotion gate:** {gate}

## Intended use and limitations
Intended use: chat replies in the domain of the training conversations. {limits}

## How to use
```python
import mlflow
model = mlflow.pyfunc.load_model("models:/{cfg.model_name}@{cfg.alias}")
model.predict([[{{"role": "user", "content": "Hello!"}}]])  # -> ["..."]; prompts work too
# Longer replies: mlflow.pyfunc.load_model(uri, model_config={{"max_new_tokens": 256}})
```
"""


def _comparison(eval_dir: Path) -> str:
    path = eval_dir / "comparison.md"
    if not path.exists():
        return ""
    # Only the table: the card has its own heading and states the gate once.
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("|"))


def save_pyfunc(path: Path, train: TrainOutput, card: str, cfg: ExportConfig) -> Path:
    """Write the pyfunc model folder: adapter + merged artifacts, model card, pinned deps."""
    import torch
    import transformers

    artifacts = {"adapter": train.adapter_dir, "merged": train.merged_dir}
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}", "safetensors", "cloudpickle"]
    with _pickled_by_value():
        mlflow.pyfunc.save_model(
            str(path), python_model=ChatModel(), artifacts=artifacts,
            pip_requirements=requirements, model_config={"max_new_tokens": cfg.max_new_tokens},
            metadata={"ftflow.base_model": train.base_model, "ftflow.method": train.method},
        )
    (path / "README.md").write_text(card)
    return path


def _wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 120) -> None:
    """Model versions on a remote registry may be PENDING_REGISTRATION for a moment."""
    deadline = time.monotonic() + timeout_s
    while client.get_model_version(name, version).status != "READY":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model version {name}/{version} not READY after {timeout_s}s")
        time.sleep(1)


def register(client: MlflowClient, run_id: str, cfg: ExportConfig, eval_manifest: Manifest,
             evaluation: EvaluateOutput, description: str) -> str:
    """Register runs:/<run>/model as a new version of cfg.model_name, alias and tag it."""
    try:
        client.get_registered_model(cfg.model_name)
    except MlflowException:
        client.create_registered_model(cfg.model_name, description=description)
    tags = {"ftflow.gate_passed": str(evaluation.gate_passed),
            "ftflow.gate": evaluation.gate[:5000]}
    tags.update({f"ftflow.metric.{k}": f"{v:.6g}" for k, v in eval_manifest.metrics.items()
                 if k.startswith(("base.", "tuned.", "gate."))})
    mv = client.create_model_version(cfg.model_name, f"runs:/{run_id}/{MODEL_ARTIFACT}",
                                     run_id=run_id, tags=tags, description=description)
    _wait_ready(client, cfg.model_name, mv.version)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, mv.version)
    return str(mv.version)


def _digest(cfg: ExportConfig, tracking_uri: str) -> str:
    # The registry is part of the config: exporting to another store is not "up to date".
    return hashlib.sha256(f"{cfg.digest()}|{tracking_uri}".encode()).hexdigest()[:16]


def run_export(train_dir: str | Path, eval_dir: str | Path, out_dir: str | Path,
               cfg: ExportConfig, *, tracking_uri: str,
               parent_run_id: str | None = None) -> Manifest:
    """Log the tuned model with its card to MLflow and register it if the gate allows."""
    train_dir, eval_dir, out = Path(train_dir), Path(eval_dir), Path(out_dir)
    stage = StageDir(out, "export", _digest(cfg, tracking_uri), train_dir, eval_dir)
    if (done := stage.finished()) is not None:
        return done
    train_manifest, train = read_output(train_dir, TrainOutput)
    eval_manifest, evaluation = read_output(eval_dir, EvaluateOutput)
    writer = stage.writer()
    card = model_card(train_manifest, train, evaluation, _comparison(eval_dir),
                      _ledger_table(train_dir.parent), cfg)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    # Not an "ftflow.stage" tag: the flow's own stage run already carries 09-export.
    tags = {MLFLOW_RUN_NAME: "export-model", "ftflow.model_run": cfg.model_name}
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    else:
        experiment_id = ensure_experiment(client, cfg.experiment, out / "mlartifacts")
    run_id = client.create_run(experiment_id, run_name="export-model", tags=tags).info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="ftflow-export-") as tmp:
            model_dir = save_pyfunc(Path(tmp) / MODEL_ARTIFACT, train, card, cfg)
            client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        write_atomic(out / CARD_NAME, card)
        client.log_artifact(run_id, str(out / CARD_NAME))
        for key in ("base_model", "method", "quantized"):
            client.log_param(run_id, key, str(getattr(train, key)))
        for key, value in eval_manifest.metrics.items():
            client.log_metric(run_id, key, float(value))
        gate_passed = evaluation.gate_passed
        version, registered = None, False
        if gate_passed or cfg.register_if_gate_fails:
            version = register(client, run_id, cfg, eval_manifest, evaluation,
                               card.split("\n## ")[0])
            registered = True
            reason = ("gate passed" if gate_passed else
                      "gate failed, registered because register_if_gate_fails is set")
        else:
            reason = ("not registered: the evaluate gate failed and register_if_gate_fails "
                      f"is off ({evaluation.gate})")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    model_uri = (f"models:/{cfg.model_name}@{cfg.alias}" if registered
                 else f"runs:/{run_id}/{MODEL_ARTIFACT}")
    registry = (f"\n## Registry\n- `{cfg.model_name}` version {version}, alias `{cfg.alias}`\n"
                if registered else f"\n## Registry\n- {reason}\n")
    write_atomic(out / CARD_NAME, card + registry)
    log.info("export: %s (%s)", model_uri, reason)
    output = ExportOutput(model_name=cfg.model_name, version=version, alias=cfg.alias,
                          model_uri=model_uri, registered=registered, reason=reason,
                          run_id=run_id, model_card=str(out / CARD_NAME))
    return writer.finish(0, metrics={"export.registered": float(registered)}, output=output,
                         outputs=[out / CARD_NAME])
