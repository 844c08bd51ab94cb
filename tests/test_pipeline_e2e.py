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
        if name in ("02-pii", "03-dedup", "04-augment", "05-pii-synthetic", "06-dedup-synthetic"):
            assert m.records_in == previous_kept, f"{name} read {m.records_in}, not {previous_kept}"
        previous_kept = m.kept
    ingest = Manifest.read(run_dir / "01-ingest")
    assert ingest.quarantined > 0 and ingest.filtered_total > 0  # the planted problems
    assert Manifest.read(run_dir / "03-dedup").deduplicated > 0
    assert Manifest.read(run_dir / "03-dedup").splits.get("eval", 0) > 0


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
    train = by_stage["07-train"]
    losses = client.get_metric_history(train.info.run_id, "step/loss")
    assert len(losses) >= 3, "per-step training loss is logged"
    assert losses[-1].value < losses[0].value, "training loss fell"
    # base and tuned side by side on the parent run
    metrics = parent.data.metrics
    assert any(k.startswith("base.") for k in metrics) and any(k.startswith("tuned.") for k in metrics)


def test_tuned_model_beats_base_on_heldout(pipeline_run: dict) -> None:
    ev = Manifest.read(Path(pipeline_run["run_dir"]) / "08-evaluate")
    ppl = [k for k in ev.metrics if k.startswith("base.") and "word_perplexity" in k]
    assert ppl, ev.metrics
    name = ppl[0][len("base."):]
    assert ev.metrics[f"tuned.{name}"] < ev.metrics[f"base.{name}"]
    assert ev.info["gate_passed"] is True


def test_registered_version_has_candidate_alias_and_loads(pipeline_run: dict) -> None:
    info = Manifest.read(Path(pipeline_run["run_dir"]) / "09-export").info
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
    before = {name: Manifest.read(run_dir / name).started_at for name in STAGE_NAMES[:8]}
    finetune_pipeline(config_path=str(REPO / "configs" / "demo.yaml"),
                      overrides=small_overrides(session_home), run_id="e2e")
    after = {name: Manifest.read(run_dir / name).started_at for name in STAGE_NAMES[:8]}
    assert after == before, "finished stages were skipped, not recomputed"
