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
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from data_contracts.config import PipelineConfig, load_config
from data_contracts.manifest import Manifest
from flows.report import LEDGER_COLUMNS, ledger_markdown, ledger_rows, publish_artifacts
from flows.arrival import Arrivals
from tasks.curate import mark_trained
from tasks.interrupt import RunInterrupted, stop_on_signals
from tasks.locks import file_lock
from tasks.quiet import quiet_library_noise
from tasks.stages import CURATION_END, STAGES, StageContext, StageSpec, spec, stage_task
from tasks.tracking import Tracker, flatten

log = logging.getLogger(__name__)
quiet_library_noise()  # also in a worker's flow runs, which do not go through the CLI


@dataclass
class PipelineResult:
    """What a run produced: where to look, and the ledger of every stage."""

    run_id: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    experiment_id: str = ""
    manifests: dict[str, Manifest] = field(default_factory=dict)
    trained: bool = True  # False: a run on new files that ended after curation
    reason: str = ""  # why it trained or not (the curate stage's decision)

    @property
    def export(self) -> Manifest:
        return self.manifests[spec("export").name]

    @property
    def evaluation(self) -> Manifest:
        return self.manifests[spec("evaluate").name]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _run_stage(tracker: Tracker, parent: str, s: StageSpec, ctx: StageContext) -> Manifest:
    """Run one stage as a Prefect task inside its own nested MLflow run."""
    logger = get_run_logger()
    cfg = ctx.cfg
    stage_run = tracker.start_stage(parent, s.name, flatten(s.config(cfg).model_dump(mode="json")))
    try:
        manifest = stage_task(s, cfg)(s, ctx)
        tracker.log_stage_result(stage_run, manifest, ctx.out)
    except BaseException as err:
        tracker.end_quietly(stage_run, _end_status(err))
        raise
    tracker.end(stage_run)
    logger.info("%s: in=%d kept=%d filtered=%d dedup=%d quarantined=%d (%.1fs)", s.name,
                manifest.records_in, manifest.kept, manifest.filtered_total,
                manifest.deduplicated, manifest.quarantined, manifest.duration_s)
    return manifest


def _end_status(err: BaseException) -> str:
    """The MLflow status of a run that ends on this exception: KILLED when it was stopped."""
    return "KILLED" if isinstance(err, (RunInterrupted, KeyboardInterrupt)) else "FAILED"


def _flow_run_url() -> str:
    """The flow run's page in the Prefect UI, when the run talks to a Prefect server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    run = flow_run.get_id()
    ui = PREFECT_UI_URL.value() if PREFECT_API_URL.value() else None
    return f"{str(ui).rstrip('/')}/runs/flow-run/{run}" if ui and run else ""


def _description(result: PipelineResult) -> str:
    """What the run did, in a few lines: the MLflow run's description."""
    m = result.manifests
    first, curated = m[STAGES[0].name], m[CURATION_END]
    text = (f"ftflow run `{result.run_id}`: {first.records_in} input records; curated dataset "
            f"version {curated.info.get('version')}: {curated.splits.get('train', 0)} records "
            f"for training and {curated.splits.get('heldout', 0)} held out.\n\n")
    if not result.trained:
        return text + f"Not trained: {result.reason}."
    ev, ex = result.evaluation, result.export
    return (text + f"{ev.info.get('gate', 'no gate result')}\n\n"
            f"Model: `{ex.info.get('model_uri', '-')}` ({ex.info.get('reason', '')})")


def with_inputs(cfg: PipelineConfig, files: list[str]) -> PipelineConfig:
    """The config of a run on newly arrived files: ingest reads exactly those files."""
    return cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"inputs": files})})


def run_pipeline(cfg: PipelineConfig, run_id: str | None = None,
                 incremental: bool = False) -> PipelineResult:
    """Run the stages under one MLflow parent run (call inside a Prefect flow). ``incremental``:
    a run on newly arrived files (the config's ingest inputs), deduplicated against the curated
    corpus and added to it; it trains once enough new records have gathered."""
    run_id = run_id or new_run_id()
    home = Path(cfg.run.home)
    home.mkdir(parents=True, exist_ok=True)
    run_dir = cfg.run.resolved_runs_dir() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.run.resolved_tracking_uri()
    # Two runs on a new home would both create and migrate the SQLite tracking store.
    with file_lock(home / "locks" / "tracking.lock", "another run is opening the tracking store"):
        tracker = Tracker(uri, cfg.run.experiment, home / "mlartifacts")
    tracker.mark_killed_attempts(run_id)  # earlier attempts of this run that were SIGKILLed
    params = {f"run.{k}": v for k, v in flatten(cfg.run.model_dump(mode="json")).items()}
    tags = {"ftflow.run_id": run_id, "ftflow.run_dir": str(run_dir),
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": str(flow_run.get_name() or "")}
    parent = tracker.start_parent(f"{cfg.run.name}-{run_id}", params, tags)
    result = PipelineResult(run_id, str(run_dir), parent, uri, tracker.experiment_id)
    m = result.manifests
    # Prefect's flow engine installs its own SIGTERM handler (raise at once, wherever): the run
    # puts back its own, which lets training stop at a checkpoint (tasks/interrupt.py).
    try:
        with stop_on_signals():
            for s in STAGES:
                inputs = tuple(run_dir / r for r in s.reads) or (cfg.ingest.inputs,)
                ctx = StageContext(cfg, run_dir / s.name, inputs, uri, parent, incremental, run_id)
                m[s.name] = _run_stage(tracker, parent, s, ctx)
                if s.name == CURATION_END:
                    result.trained = bool(m[s.name].info.get("train", True))
                    result.reason = str(m[s.name].info.get("train_reason", ""))
                    if not result.trained:
                        get_run_logger().info("curated only, not training: %s", result.reason)
                        break
    except BaseException as err:
        tracker.end_quietly(parent, _end_status(err))
        raise
    curated = m[CURATION_END]
    tags = {"ftflow.trained": result.trained, "ftflow.incremental": incremental,
            "ftflow.curated_version": curated.info.get("version"),
            "prefect.flow_run_url": _flow_run_url(), "mlflow.note.content": _description(result)}
    if result.trained:
        ev, ex = result.evaluation, result.export
        tracker.log_metrics(parent, {k: v for k, v in ev.metrics.items()
                                     if k.startswith(("base.", "tuned.", "stderr.", "gate.",
                                                      "judge."))})
        tracker.log_datasets(parent, run_dir / spec("train").reads[0],
                             {"train": "training", "heldout": "heldout"})
        tags.update({"ftflow.gate_passed": ev.info.get("gate_passed"),
                     "ftflow.model_uri": ex.info.get("model_uri", ""),
                     "ftflow.registered_version": ex.info.get("version") or "",
                     **ev.info.get("mlflow_tags", {})})
        mark_trained(home, cfg.curate.dataset or cfg.run.name, int(curated.info["version"]))
    else:
        tracker.log_datasets(parent, run_dir / CURATION_END, {"train": "curated",
                                                              "heldout": "heldout"})
    tracker.set_tags(parent, tags)
    (run_dir / "LEDGER.md").write_text(ledger_markdown(m) + "\n")
    tracker.client.log_artifact(parent, str(run_dir / "LEDGER.md"))
    tracker.client.log_table(parent, {k: [r[k] for r in ledger_rows(m)] for k in LEDGER_COLUMNS},
                             "ledger.json")
    tracker.end(parent)
    return result


# log_prints stays off: Prefect's print capture replaces print() even where a library redirects
# sys.stdout to read its own output back, and dill (datasets' fingerprinting, in training) does
# exactly that with dis.dis: 800+ lines of bytecode landed in the run log and dill read nothing.
@flow(name="finetune-pipeline", log_prints=False)
def finetune_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                      run_id: str | None = None, files: list[str] | None = None
                      ) -> dict[str, Any]:
    """Ingest, scrub, dedup, augment, train, benchmark and register a model from one config.

    ``files`` (a data-arrival run): read exactly these files, dedup them against the curated
    corpus and add them to it; each file is read by one successful run only.
    """
    cfg = load_config(config_path, overrides)
    if files is None:
        result = run_pipeline(cfg, run_id)
    else:
        arrivals, me = Arrivals(cfg.run.home), str(flow_run.get_id() or run_id or new_run_id())
        mine = arrivals.claim(files, me)
        if not mine:
            get_run_logger().info("every file is consumed or taken by another run: %s", files)
            return {"run_id": None, "files": [], "skipped": "no unclaimed file"}
        try:
            result = run_pipeline(with_inputs(cfg, mine), run_id, incremental=True)
        except BaseException:
            arrivals.release(mine, me)
            raise
        arrivals.consume(mine, me)
    publish_artifacts(result.run_id, result.manifests, result.tracking_uri, result.experiment_id,
                      result.mlflow_run_id, result.reason if not result.trained else "")
    return {
        "files": files,
        "trained": result.trained,
        "reason": result.reason,
        "run_id": result.run_id,
        "flow_run_id": str(flow_run.get_id() or ""),
        "run_dir": result.run_dir,
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": result.tracking_uri,
        "mlflow_experiment_id": result.experiment_id,
        "ledger": {k: v.model_dump(mode="json") for k, v in result.manifests.items()},
    }
