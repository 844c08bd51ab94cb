"""Stage 10: release the tuned model: the formats people run, an MLflow 3 logged model with a
model card, a registered version with ``candidate`` and (when it earns it) ``champion``.

The export folder holds ``merged/`` (safetensors + tokenizer that transformers 4.4x+ and 5.x
load), ``adapter/`` (peft LoRA, portable base id), ``gguf/`` (f16/q8_0 GGUF files and an Ollama
Modelfile), ``lm-eval/`` (the benchmark tasks, runnable on a copy with ``--include_path``) and
``MODEL_CARD.md``. The MLflow logged model (a chat pyfunc over ``merged/``) takes chats or prompts
and replies through the saved chat template. Registration happens only when the evaluate gate
passed, unless ``register_if_gate_fails``; aliases move as tasks/export_registry.py describes.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent active-run
stack or the global tracking URI, so the caller's MLflow state is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from data_contracts.config import ExportConfig, default_home
from data_contracts.manifest import Manifest
from data_contracts.stage_outputs import EvaluateOutput, ExportOutput, TrainOutput, read_output
from tasks import export_formats as formats
from tasks import export_registry as registry
from tasks.export_card import model_card
from tasks.export_gguf import GGUFExportError, write_gguf
from tasks.stage_dir import StageDir, write_atomic
from tasks.tracking import ensure_experiment

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
CARD_NAME = "MODEL_CARD.md"
MERGED, ADAPTER, GGUF, LMEVAL = "merged", "adapter", "gguf", "lm-eval"


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


def save_pyfunc(path: Path, merged: Path, adapter: Path, card: str, cfg: ExportConfig,
                base_model: str, mlflow_model: Any = None) -> Path:
    """Write the pyfunc model folder: merged + adapter artifacts, model card, pinned deps."""
    import torch
    import transformers

    artifacts = {"adapter": str(adapter), "merged": str(merged)}
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}", "safetensors", "cloudpickle"]
    with _pickled_by_value():
        mlflow.pyfunc.save_model(
            str(path), python_model=ChatModel(), artifacts=artifacts, mlflow_model=mlflow_model,
            pip_requirements=requirements, model_config={"max_new_tokens": cfg.max_new_tokens},
            metadata={"ftflow.base_model": base_model},
        )
    (path / "README.md").write_text(card)
    return path


def target_score(evaluation: EvaluateOutput) -> tuple[float | None, bool]:
    """The tuned model's score on the gate metric and its direction. Falls back to results.json
    for an evaluate stage that does not hand over target_score."""
    if evaluation.target_score is not None:
        return evaluation.target_score, evaluation.higher_is_better
    from tasks.evaluate import lower_is_better

    task, _, metric = evaluation.gate_metric.partition(".")
    try:
        results = json.loads(Path(evaluation.results).read_text())
        score = float(results["tuned"][task][metric])
    except (OSError, KeyError, TypeError, ValueError):
        return None, not lower_is_better(metric)
    return score, not lower_is_better(metric)


def write_formats(out: Path, train: TrainOutput, eval_dir: Path,
                  cfg: ExportConfig) -> tuple[dict[str, str], list[Path], str]:
    """merged/, adapter/, gguf/ (+ Modelfile), lm-eval/ under out: (facts, paths, card text)."""
    for name in (MERGED, ADAPTER, GGUF, LMEVAL):
        shutil.rmtree(out / name, ignore_errors=True)
    merged = formats.write_merged(Path(train.merged_dir), out / MERGED)
    adapter = formats.write_adapter(Path(train.adapter_dir), out / ADAPTER, train.base_model)
    facts: dict[str, str] = {"merged_dir": str(merged), "adapter_dir": str(adapter)}
    paths, lines = [merged, adapter], [
        f"- `{MERGED}/`: merged model, safetensors + tokenizer (transformers 4.4x+ and 5.x)",
        f"- `{ADAPTER}/`: LoRA adapter; base `"
        f"{formats.portable_base_id(train.base_model)}` (from `{train.base_model}`)"]
    template = formats.strip_generation_markers(
        (merged / "chat_template.jinja").read_text() if (merged / "chat_template.jinja").exists()
        else "")
    if cfg.gguf:
        try:
            (out / GGUF).mkdir()
            files = [write_gguf(merged, out / GGUF / f"{cfg.model_name}-{q}.gguf", q, template,
                                cfg.model_name) for q in cfg.gguf]
            params = {"num_ctx": json.loads((merged / "config.json").read_text())
                      .get("max_position_embeddings", 2048), **cfg.ollama_parameters}
            (out / GGUF / "Modelfile").write_text(formats.modelfile(
                files[-1].name, template, cfg.system_prompt, params))
            formats.make_readable(out / GGUF)
            facts["gguf"] = ",".join(str(f) for f in files)
            paths.append(out / GGUF)
            lines.append(f"- `{GGUF}/`: {', '.join(f.name for f in files)} and an Ollama "
                         f"`Modelfile` (`cd {GGUF} && ollama create {cfg.model_name} -f Modelfile`)")
        except (GGUFExportError, ValueError) as err:
            shutil.rmtree(out / GGUF, ignore_errors=True)
            log.warning("export: no GGUF/Ollama files: %s", err)
            facts["gguf_skipped"] = str(err)
            lines.append(f"- GGUF: not written: {err}")
    tasks_dir = Path(eval_dir) / "tasks"
    if tasks_dir.is_dir() and any(tasks_dir.glob("*.yaml")):
        names, skipped = formats.write_lmeval_tasks(tasks_dir, out / LMEVAL)
        facts["lmeval_tasks"] = ",".join(names)
        if skipped:
            log.warning("export: lm-eval tasks left out of %s: %s", LMEVAL, "; ".join(skipped))
            facts["lmeval_skipped"] = "; ".join(skipped)
        paths.append(out / LMEVAL)
        lines.append(f"- `{LMEVAL}/`: the benchmark's tasks: `lm_eval --model hf --model_args "
                     f"pretrained={MERGED} --include_path {LMEVAL} --tasks {','.join(names)}`")
    return facts, paths, "\n".join(lines)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's local (SQLAlchemy) registry resolves a version's ``models:/<model id>`` source
    through the global tracking URI, not the client's: point it at ours for that one call and
    put back exactly what was there (the variable too)."""
    from mlflow.tracking._tracking_service import utils

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with utils._use_tracking_uri(uri):
            yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _digest(cfg: ExportConfig, tracking_uri: str) -> str:
    # The registry is part of the config: exporting to another store is not "up to date".
    return hashlib.sha256(f"{cfg.digest()}|{tracking_uri}".encode()).hexdigest()[:16]


def log_model(client: MlflowClient, run_id: str, experiment_id: str, out: Path, card: str,
              cfg: ExportConfig, train: TrainOutput, metrics: dict[str, float]) -> str:
    """The pyfunc as an MLflow 3 logged model, an output of the run; returns its model id."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    logged = client.create_logged_model(
        experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id, model_type="ftflow-chat",
        params={"base_model": train.base_model, "method": train.method},
        tags={"ftflow.model_name": cfg.model_name})
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    try:
        meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                     run_id=run_id, model_id=logged.model_id)
        with tempfile.TemporaryDirectory(prefix="ftflow-export-") as tmp:
            model_dir = save_pyfunc(Path(tmp) / MODEL_ARTIFACT, out / MERGED, out / ADAPTER,
                                    card, cfg, train.base_model, meta)
            client.log_model_artifacts(logged.model_id, str(model_dir))
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value), model_id=logged.model_id)
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return str(logged.model_id)


def log_eval_table(client: MlflowClient, run_id: str, eval_manifest: Manifest) -> None:
    """The base-vs-tuned numbers as an MLflow table (the run's Evaluation/Artifacts view)."""
    rows = [(k[len("base."):], v, eval_manifest.metrics.get("tuned." + k[len("base."):]))
            for k, v in sorted(eval_manifest.metrics.items()) if k.startswith("base.")]
    if rows:
        client.log_table(run_id, {"task.metric": [r[0] for r in rows],
                                  "base": [r[1] for r in rows], "tuned": [r[2] for r in rows]},
                         "eval_table.json")


def register(client: MlflowClient, run_id: str, model_id: str, cfg: ExportConfig, home: Path,
             eval_manifest: Manifest, evaluation: EvaluateOutput,
             description: str) -> tuple[str, str]:
    """A new version of cfg.model_name from the logged model: tags, `candidate`, and
    `champion` when it earns it. Returns the version and what happened to `champion`."""
    try:
        client.get_registered_model(cfg.model_name)
    except MlflowException:
        try:
            client.create_registered_model(cfg.model_name, description=description)
        except MlflowException:  # another run created it in between
            client.get_registered_model(cfg.model_name)
    score, higher = target_score(evaluation)
    tags = {registry.GATE_TAG: str(evaluation.gate_passed), "ftflow.gate": evaluation.gate[:5000],
            registry.METRIC_TAG: evaluation.gate_metric, registry.DIRECTION_TAG: str(higher)}
    if score is not None and math.isfinite(score):
        tags[registry.SCORE_TAG] = repr(score)
    tags.update({f"ftflow.metric.{k}": f"{v:.6g}" for k, v in eval_manifest.metrics.items()
                 if k.startswith(("base.", "tuned.", "gate."))})
    with _global_tracking_uri(client.tracking_uri):
        mv = client.create_model_version(cfg.model_name, f"models:/{model_id}", run_id=run_id,
                                         tags=tags, description=description, model_id=model_id)
    version = str(mv.version)
    registry.wait_ready(client, cfg.model_name, version)
    registry.move_candidate(client, home, cfg.model_name, version, cfg.alias)
    if not cfg.champion:
        return version, "champion unchanged: export.champion is off"
    _, why = registry.offer_champion(client, home, cfg.model_name, version,
                                     evaluation.gate_passed, evaluation.gate_metric, score, higher)
    return version, why


def run_export(train_dir: str | Path, eval_dir: str | Path, out_dir: str | Path,
               cfg: ExportConfig, *, tracking_uri: str, parent_run_id: str | None = None,
               home: str | Path | None = None,
               run_config: dict[str, Any] | None = None) -> Manifest:
    """Write the formats, log the model with its card to MLflow, register it if the gate allows."""
    train_dir, eval_dir, out = Path(train_dir), Path(eval_dir), Path(out_dir)
    home = Path(home) if home is not None else default_home()
    stage = StageDir(out, "export", _digest(cfg, tracking_uri), train_dir, eval_dir)
    if (done := stage.finished()) is not None:
        return done
    train_manifest, train = read_output(train_dir, TrainOutput)
    eval_manifest, evaluation = read_output(eval_dir, EvaluateOutput)
    writer = stage.writer()
    facts, paths, format_lines = write_formats(out, train, eval_dir, cfg)
    card = model_card(train_manifest, train, evaluation, eval_dir, train_dir.parent, cfg,
                      run_config, format_lines)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    # Not an "ftflow.stage" tag: the flow's own stage run already carries 10-export.
    tags = {MLFLOW_RUN_NAME: "export-model", "ftflow.model_run": cfg.model_name,
            "ftflow.gate_passed": str(evaluation.gate_passed), "ftflow.gate": evaluation.gate[:5000],
            "ftflow.gate_metric": evaluation.gate_metric}
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    else:
        experiment_id = ensure_experiment(client, cfg.experiment, out / "mlartifacts")
    run_id = client.create_run(experiment_id, run_name="export-model", tags=tags).info.run_id
    try:
        for key in ("base_model", "method", "quantized"):
            client.log_param(run_id, key, str(getattr(train, key)))
        model_id = log_model(client, run_id, experiment_id, out, card, cfg, train,
                             eval_manifest.metrics)
        log_eval_table(client, run_id, eval_manifest)
        version, registered, champion = None, False, ""
        if evaluation.gate_passed or cfg.register_if_gate_fails:
            version, champion = register(client, run_id, model_id, cfg, home, eval_manifest,
                                         evaluation, card.split("\n## ")[0])
            registered = True
            reason = ("gate passed" if evaluation.gate_passed else
                      "gate failed, registered because register_if_gate_fails is set")
        else:
            reason = ("not registered: the evaluate gate failed and register_if_gate_fails "
                      f"is off ({evaluation.gate})")
        client.set_tag(run_id, "ftflow.registered", str(registered))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    model_uri = (f"models:/{cfg.model_name}@{cfg.alias}" if registered else f"models:/{model_id}")
    registry_md = (f"\n## Registry\n- `{cfg.model_name}` version {version}, alias `{cfg.alias}`"
                   f"\n- {champion}\n" if registered else f"\n## Registry\n- {reason}\n")
    write_atomic(out / CARD_NAME, card + registry_md)
    client.log_artifact(run_id, str(out / CARD_NAME))
    log.info("export: %s (%s; %s)", model_uri, reason, champion or "-")
    output = ExportOutput(model_name=cfg.model_name, version=version, alias=cfg.alias,
                          model_uri=model_uri, registered=registered, reason=reason,
                          run_id=run_id, model_card=str(out / CARD_NAME))
    info = {**facts, "model_id": model_id, "champion": champion}
    return writer.finish(0, metrics={"export.registered": float(registered)}, output=output,
                         info=info, outputs=[out / CARD_NAME, *paths])
