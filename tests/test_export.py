"""Stage 7: log the tuned model to a real MLflow registry (SQLite), alias it, load and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from data_contracts.config import ExportConfig
from data_contracts.manifest import Manifest
from data_contracts.stage_outputs import EvaluateOutput, StageOutputError, output_info
from tasks.export import CARD_NAME, run_export

PPL = "ftflow_heldout_ppl.word_perplexity"
CHAT = [{"role": "user", "content": "How do I reset my password?"}]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _eval_dir(root: Path, passed: bool) -> Path:
    """An evaluate stage dir as tasks/evaluate.py writes it (manifest + comparison.md)."""
    root.mkdir(parents=True)
    gate = (f"gate {'passed' if passed else 'failed'}: {PPL} (lower is better) base 2.8e+07 "
            f"-> tuned {'5371' if passed else '3.1e+07'}")
    (root / "comparison.md").write_text(
        "# Base vs tuned on 10 held-out records\n\n| task | metric | base | tuned | delta | better |"
        "\n|---|---|---|---|---|---|\n| ftflow_heldout_ppl | word_perplexity | 2.8e+07 | 5371 "
        f"| -2.8e+07 | lower |\n\n{gate}\n")
    verdict = EvaluateOutput(gate_passed=passed, gate=gate, gate_metric=PPL,
                             results=str(root / "results.json"),
                             comparison=str(root / "comparison.md"))
    Manifest(stage="evaluate", metrics={f"base.{PPL}": 2.8e7, f"tuned.{PPL}": 5371.0},
             info=output_info(verdict)).write(root)
    return root


@pytest.fixture
def tracking(tmp_path: Path) -> Iterator[tuple[str, MlflowClient, str]]:
    """A SQLite tracking store with its artifacts under tmp_path, and a parent run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ftflow-test", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    yield uri, client, parent


def test_export_registers_an_aliased_model_that_loads_and_chats(
        tmp_path: Path, train_dir: Path, tracking: tuple[str, MlflowClient, str]) -> None:
    uri, client, parent = tracking
    before = mlflow.get_tracking_uri()
    cfg = ExportConfig(model_name="ftflow-test", max_new_tokens=12)
    m = run_export(train_dir, _eval_dir(tmp_path / "heldout", True), tmp_path / "out", cfg,
                   tracking_uri=uri, parent_run_id=parent)
    m.check()
    # The caller's MLflow state is untouched.
    assert mlflow.get_tracking_uri() == before and mlflow.active_run() is None
    assert m.info["registered"] is True and m.info["model_uri"] == "models:/ftflow-test@candidate"
    mv = client.get_model_version_by_alias("ftflow-test", "candidate")
    assert str(mv.version) == m.info["version"] == "1"
    assert mv.tags["ftflow.gate_passed"] == "True" and mv.tags[f"ftflow.metric.tuned.{PPL}"] == "5371"
    run = client.get_run(m.info["run_id"])
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent and run.info.status == "FINISHED"
    assert run.data.metrics[f"tuned.{PPL}"] == 5371.0
    files = {f.path for f in client.list_artifacts(m.info["run_id"], "model/artifacts/merged")}
    assert "model/artifacts/merged/model.safetensors" in files
    adapter = {f.path for f in client.list_artifacts(m.info["run_id"], "model/artifacts/adapter")}
    assert "model/artifacts/adapter/adapter_model.safetensors" in adapter

    card = (tmp_path / "out" / CARD_NAME).read_text()
    for text in ("| word_perplexity | 2.8e+07 | 5371", "gate passed", "Base model:",
                 "r=16", "Intended use", "version 1, alias `candidate`"):
        assert text in card

    try:
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model("models:/ftflow-test@candidate")
    finally:
        mlflow.set_tracking_uri(before)
    replies = model.predict([CHAT])
    assert isinstance(replies, list) and len(replies) == 1 and isinstance(replies[0], str)
    assert model.predict(["How do I reset my password?"]) == replies
    # The served reply is the merged model's own greedy reply through its chat template.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_dir / "merged")
    lm = AutoModelForCausalLM.from_pretrained(train_dir / "merged")
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = lm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert replies[0] == tok.decode(out[0, ids["input_ids"].shape[1]:],
                                    skip_special_tokens=True).strip()


def test_failed_gate_is_not_registered_unless_asked(
        tmp_path: Path, train_dir: Path, tracking: tuple[str, MlflowClient, str]) -> None:
    uri, client, _ = tracking
    eval_dir = _eval_dir(tmp_path / "heldout", False)
    m = run_export(train_dir, eval_dir, tmp_path / "out", ExportConfig(model_name="held-back"),
                   tracking_uri=uri)
    m.check()
    assert m.info["registered"] is False and m.info["version"] is None
    assert "gate failed" in m.info["reason"] and m.info["model_uri"].startswith("runs:/")
    assert client.search_registered_models("name='held-back'") == []
    assert "gate failed" in (tmp_path / "out" / CARD_NAME).read_text()
    # Without a parent run the stage uses its own experiment, artifacts under out_dir.
    run = client.get_run(m.info["run_id"])
    assert MLFLOW_PARENT_RUN_ID not in run.data.tags
    assert str(tmp_path / "out") in run.info.artifact_uri

    forced = run_export(train_dir, eval_dir, tmp_path / "out2",
                        ExportConfig(model_name="held-back", register_if_gate_fails=True),
                        tracking_uri=uri)
    assert forced.info["registered"] is True and "register_if_gate_fails" in forced.info["reason"]
    assert str(client.get_model_version_by_alias("held-back", "candidate").version) == "1"


def test_a_missing_hand_off_field_names_the_stage_and_field(
        tmp_path: Path, train_dir: Path, tracking: tuple[str, MlflowClient, str]) -> None:
    """A renamed or missing field of an earlier stage fails at once, saying which."""
    uri, _, parent = tracking
    eval_dir = _eval_dir(tmp_path / "heldout", True)
    m = Manifest.read(eval_dir)
    del m.info["gate_passed"]
    m.write(eval_dir)
    with pytest.raises(StageOutputError, match=r"stage 'evaluate'.*field 'gate_passed'"):
        run_export(train_dir, eval_dir, tmp_path / "out", ExportConfig(), tracking_uri=uri,
                   parent_run_id=parent)
    assert not (tmp_path / "out" / "manifest.json").exists()
