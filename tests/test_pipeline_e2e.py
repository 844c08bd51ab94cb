"""The whole flow on real Prefect (local mode) and a real MLflow store, then what it left."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from data_contracts.manifest import Manifest
from flows.pipeline import finetune_pipeline
from tasks.stages import STAGES

STAGE_NAMES = [s.name for s in STAGES]

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def small_overrides(home: Path) -> list[str]:
    """The demo config, sized for CI: fewer seeds and steps, same stages and libraries."""
    return [
        f"run.home={home}",
        "run.experiment=e2e",
        f"ingest.inputs={json.dumps([str(REPO / 'sample_data' / '*.jsonl'), str(REPO / 'sample_data' / '*.csv'), str(REPO / 'sample_data' / '*.parquet')])}",
        "augment.max_seed_records=4",
        "train.max_steps=60",
        "train.eval_steps=20",
        "train.save_steps=20",
        "evaluate.max_samples=24",
        "export.model_name=ftflow-e2e",
    ]


@pytest.fixture(scope="module")
def pipeline_run(session_home: Path) -> dict:
    out = finetune_pipeline(config_path=str(REPO / "configs" / "demo.yaml"),
                            overrides=small_overrides(session_home), run_id="e2e")
    return out


def test_every_stage_accounts_for_every_record(pipeline_run: dict) -> None:
    run_dir = Path(pipeline_run["run_dir"])
    previous_kept = None
    for name in STAGE_NAMES:
        m = Manifest.read(run_dir / name)
        m.check()  # in + generated == kept + filtered + deduplicated + quarantined
        if name in ("02-pii", "03-dedup", "04-curate", "05-augment", "06-pii-synthetic",
                    "07-dedup-synthetic"):
            assert m.records_in == previous_kept, f"{name} read {m.records_in}, not {previous_kept}"
        previous_kept = m.kept
    ingest = Manifest.read(run_dir / "01-ingest")
    assert ingest.quarantined > 0 and ingest.filtered_total > 0  # the planted problems
    assert Manifest.read(run_dir / "03-dedup").deduplicated > 0
    assert Manifest.read(run_dir / "03-dedup").splits.get("heldout", 0) > 0


def test_mlflow_has_parent_and_nested_stage_runs(pipeline_run: dict) -> None:
    client = MlflowClient(pipeline_run["tracking_uri"])
    parent = client.get_run(pipeline_run["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["ftflow.stage"]: r for r in children if "ftflow.stage" in r.data.tags}
    assert set(by_stage) == {name for name in STAGE_NAMES}
    ingest = by_stage["01-ingest"]
    assert ingest.data.metrics["records_in"] == (
        ingest.data.metrics["kept"] + ingest.data.metrics["filtered"]
        + ingest.data.metrics["deduplicated"] + ingest.data.metrics["quarantined"])
    assert "ingest.languages" in " ".join(ingest.data.params) or ingest.data.params
    assert "manifest.json" in {a.path for a in client.list_artifacts(ingest.info.run_id)}
    train = by_stage["08-train"]
    losses = client.get_metric_history(train.info.run_id, "step/loss")
    assert len(losses) >= 3, "per-step training loss is logged"
    assert losses[-1].value < losses[0].value, "training loss fell"
    # base and tuned side by side on the parent run
    metrics = parent.data.metrics
    assert any(k.startswith("base.") for k in metrics) and any(k.startswith("tuned.") for k in metrics)


def test_tuned_model_beats_base_on_heldout(pipeline_run: dict) -> None:
    ev = Manifest.read(Path(pipeline_run["run_dir"]) / "09-evaluate")
    ppl = [k for k in ev.metrics if k.startswith("base.") and "word_perplexity" in k]
    assert ppl, ev.metrics
    name = ppl[0][len("base."):]
    assert ev.metrics[f"tuned.{name}"] < ev.metrics[f"base.{name}"]
    assert ev.info["gate_passed"] is True


def test_registered_version_has_candidate_alias_and_loads(pipeline_run: dict) -> None:
    info = Manifest.read(Path(pipeline_run["run_dir"]) / "10-export").info
    client = MlflowClient(pipeline_run["tracking_uri"])
    version = client.get_model_version_by_alias("ftflow-e2e", "candidate")
    assert str(version.version) == str(info["version"])
    mlflow.set_tracking_uri(pipeline_run["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/ftflow-e2e@candidate")
    reply = model.predict([[{"role": "user", "content": "How do I reset my password?"}]])
    assert isinstance(reply[0], str)


def test_rerun_of_same_run_resumes_without_redoing_stages(pipeline_run: dict,
                                                          session_home: Path) -> None:
    run_dir = Path(pipeline_run["run_dir"])
    before = {name: Manifest.read(run_dir / name).started_at for name in STAGE_NAMES[:9]}
    finetune_pipeline(config_path=str(REPO / "configs" / "demo.yaml"),
                      overrides=small_overrides(session_home), run_id="e2e")
    after = {name: Manifest.read(run_dir / name).started_at for name in STAGE_NAMES[:9]}
    assert after == before, "finished stages were skipped, not recomputed"


def _prefect_view(flow_run_id: str) -> tuple[list, list, list]:
    """What the Prefect UI shows of a flow run: its task runs, artifacts and logs."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    run = UUID(flow_run_id)
    with get_client(sync_client=True) as client:
        return (client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run]))),
                client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run]))),
                client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run]))))


def test_prefect_shows_stages_by_name_progress_tables_gate_and_readable_logs(
        pipeline_run: dict) -> None:
    """In the Prefect UI a stage's task run carries its directory's name, a progress artifact
    says how far it got, the ledger and base-vs-tuned are tables, the gate is stated, and the
    log holds the run's own lines (no bytecode from a library)."""
    task_runs, artifacts, logs = _prefect_view(pipeline_run["flow_run_id"])
    assert set(STAGE_NAMES) <= {t.name for t in task_runs}
    progress = {str(a.description).split(":")[0]: a for a in artifacts if a.type == "progress"}
    assert {"ingest", "pii", "dedup", "train", "train steps"} <= set(progress), progress.keys()
    assert float(progress["train steps"].data) == 100.0
    assert "loss" in progress["train steps"].description
    assert float(progress["pii"].data) == 100.0  # every record read was written
    by_key = {a.key: a for a in artifacts if a.key}
    assert by_key["ftflow-ledger"].type == "table" and "01-ingest" in str(by_key["ftflow-ledger"].data)
    assert by_key["ftflow-eval"].type == "table" and "word_perplexity" in str(by_key["ftflow-eval"].data)
    assert "Gate: passed" in str(by_key["ftflow-gate"].data)
    # Prefect's print capture would send dill's dis.dis output (datasets' fingerprinting) to
    # the run log as 800+ lines; the flow keeps it off (flows/pipeline.py).
    assert finetune_pipeline.log_prints is False
    assert not [entry.message for entry in logs if "LOAD_FAST" in entry.message], \
        "no bytecode disassembly in the run's log"


def test_review_in_mlflow_lineage_and_description(pipeline_run: dict) -> None:
    """The parent run names the curated datasets it trained and was judged on (digests and
    context), the registered version, and says in its description what the run did."""
    client = MlflowClient(pipeline_run["tracking_uri"])
    parent = client.get_run(pipeline_run["mlflow_run_id"])
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert set(inputs) == {"07-dedup-synthetic/train", "07-dedup-synthetic/heldout"}
    contexts = {name: {t.key: t.value for t in d.tags} for name, d in inputs.items()}
    assert contexts["07-dedup-synthetic/train"]["mlflow.data.context"] == "training"
    assert contexts["07-dedup-synthetic/heldout"]["mlflow.data.context"] == "heldout"
    assert all(len(d.dataset.digest) == 16 for d in inputs.values())
    tags = parent.data.tags
    export = Manifest.read(Path(pipeline_run["run_dir"]) / "10-export").info
    assert tags["ftflow.registered_version"] == str(export["version"])
    assert "input records" in tags["mlflow.note.content"] and "gate" in tags["mlflow.note.content"]
