"""The finetune_pipeline flow: seven stages, one MLflow parent run, a nested run per stage.

Data moves through stage directories under ``runs/<run-id>/``; Prefect passes paths and
manifests. A stage whose manifest already records the same input and config is skipped, so
re-running a crashed run (same ``run_id``) resumes at the first incomplete stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from data_contracts.config import PipelineConfig, load_config
from data_contracts.manifest import Manifest
from tasks.augment import augment_task
from tasks.dedup import dedup_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.ingest import ingest_task
from tasks.pii import pii_task
from tasks.tracking import Tracker, flatten
from tasks.train import train_task

log = logging.getLogger(__name__)

# Stage directory name -> config section it is configured by.
STAGES = [
    ("01-ingest", "ingest"),
    ("02-pii", "pii"),
    ("03-dedup", "dedup"),
    ("04-augment", "augment"),
    ("05-pii-synthetic", "pii"),
    ("06-dedup-synthetic", "dedup"),
    ("07-train", "train"),
    ("08-evaluate", "evaluate"),
    ("09-export", "export"),
]


@dataclass
class PipelineResult:
    """What a run produced: where to look, and the ledger of every stage."""

    run_id: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    manifests: dict[str, Manifest] = field(default_factory=dict)

    @property
    def export(self) -> Manifest:
        return self.manifests["09-export"]

    @property
    def evaluation(self) -> Manifest:
        return self.manifests["08-evaluate"]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def ledger_table(manifests: dict[str, Manifest]) -> str:
    """The ledger as a markdown table: every record of every stage accounted for."""
    rows = ["| stage | in | generated | kept | filtered | deduplicated | quarantined | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in manifests.items():
        rows.append(f"| {name} | {m.records_in} | {m.generated} | {m.kept} | {m.filtered_total} "
                    f"| {m.deduplicated} | {m.quarantined} | {m.duration_s:.1f} |")
    return "\n".join(rows)


def _run_stage(tracker: Tracker, parent: str, name: str, section: Any,
               call: Callable[[Path], Manifest], run_dir: Path) -> Manifest:
    """Run one stage inside its own nested MLflow run; mark the run failed if it raises."""
    logger = get_run_logger()
    out = run_dir / name
    stage_run = tracker.start_stage(parent, name, flatten(section.model_dump(mode="json")))
    try:
        manifest = call(out)
        tracker.log_stage_result(stage_run, manifest, out)
    except BaseException:
        tracker.end(stage_run, "FAILED")
        raise
    tracker.end(stage_run)
    logger.info("%s: in=%d kept=%d filtered=%d dedup=%d quarantined=%d (%.1fs)", name,
                manifest.records_in, manifest.kept, manifest.filtered_total,
                manifest.deduplicated, manifest.quarantined, manifest.duration_s)
    return manifest


def run_pipeline(cfg: PipelineConfig, run_id: str | None = None) -> PipelineResult:
    """Run all stages under one MLflow parent run (call inside a Prefect flow)."""
    run_id = run_id or new_run_id()
    home = Path(cfg.run.home)
    home.mkdir(parents=True, exist_ok=True)
    run_dir = cfg.run.resolved_runs_dir() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.run.resolved_tracking_uri()
    tracker = Tracker(uri, cfg.run.experiment, home / "mlartifacts")
    params = {f"run.{k}": v for k, v in flatten(cfg.run.model_dump(mode="json")).items()}
    tags = {"ftflow.run_id": run_id, "ftflow.run_dir": str(run_dir),
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": str(flow_run.get_name() or "")}
    parent = tracker.start_parent(f"{cfg.run.name}-{run_id}", params, tags)
    result = PipelineResult(run_id, str(run_dir), parent, uri)
    m = result.manifests
    seed = cfg.run.seed

    def opts(t: Any) -> Any:
        return t.with_options(cache_policy=NO_CACHE)

    tasks = {name: opts(t) for name, t in {
        "ingest": ingest_task, "pii": pii_task, "dedup": dedup_task, "augment": augment_task,
        "train": train_task, "evaluate": evaluate_task, "export": export_task}.items()}
    d = {name: run_dir / name for name, _ in STAGES}
    calls: dict[str, Callable[[Path], Manifest]] = {
        "01-ingest": lambda o: tasks["ingest"](
            cfg.ingest.inputs, o, cfg.ingest, home=home, base_model=cfg.train.base_model,
            trust_remote_code=cfg.train.trust_remote_code),
        "02-pii": lambda o: tasks["pii"](d["01-ingest"], o, cfg.pii, home=home),
        "03-dedup": lambda o: tasks["dedup"](d["02-pii"], o, cfg.dedup, home=home, seed=seed),
        "04-augment": lambda o: tasks["augment"](d["03-dedup"], o, cfg.augment, home=home),
        "05-pii-synthetic": lambda o: tasks["pii"](d["04-augment"], o, cfg.pii, home=home),
        "06-dedup-synthetic": lambda o: tasks["dedup"](d["05-pii-synthetic"], o, cfg.dedup,
                                                       home=home, seed=seed),
        "07-train": lambda o: tasks["train"](d["06-dedup-synthetic"], o, cfg.train, home=home,
                                             seed=seed),
        "08-evaluate": lambda o: tasks["evaluate"](d["06-dedup-synthetic"], d["07-train"], o,
                                                   cfg.evaluate, home=home),
        "09-export": lambda o: tasks["export"](d["07-train"], d["08-evaluate"], o, cfg.export,
                                               tracking_uri=uri, parent_run_id=parent),
    }
    try:
        for name, section in STAGES:
            m[name] = _run_stage(tracker, parent, name, getattr(cfg, section), calls[name],
                                 run_dir)
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    ev, ex = m["08-evaluate"], m["09-export"]
    tracker.log_metrics(parent, {k: v for k, v in ev.metrics.items()
                                 if k.startswith(("base.", "tuned."))})
    tracker.set_tags(parent, {"ftflow.gate_passed": ev.info.get("gate_passed"),
                              "ftflow.model_uri": ex.info.get("model_uri", "")})
    table = ledger_table(m)
    (run_dir / "LEDGER.md").write_text(table + "\n")
    tracker.client.log_artifact(parent, str(run_dir / "LEDGER.md"))
    tracker.end(parent)
    return result


@flow(name="finetune-pipeline", log_prints=True)
def finetune_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                      run_id: str | None = None) -> dict[str, Any]:
    """Ingest, scrub, dedup, augment, train, benchmark and register a model from one config."""
    cfg = load_config(config_path, overrides)
    result = run_pipeline(cfg, run_id)
    ev, ex = result.evaluation, result.export
    create_markdown_artifact(
        key="ftflow-ledger",
        markdown=(f"# ftflow run {result.run_id}\n\nMLflow run `{result.mlflow_run_id}` at "
                  f"`{result.tracking_uri}`\n\nModel: `{ex.info.get('model_uri', '-')}`\n\n"
                  f"Gate: {ev.info.get('gate', '-')}\n\n{ledger_table(result.manifests)}\n"),
        description="ftflow ledger and links",
    )
    return {
        "run_id": result.run_id,
        "run_dir": result.run_dir,
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": result.tracking_uri,
        "ledger": {k: v.model_dump(mode="json") for k, v in result.manifests.items()},
    }
