"""Stage 10: the export on a real MLflow registry (SQLite): the logged model, aliases, the card,
and each format loaded by the program that runs it (transformers, gguf's reader, lm-eval)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from data_contracts.config import EvaluateConfig, ExportConfig
from data_contracts.manifest import Manifest
from data_contracts.stage_outputs import EvaluateOutput, StageOutputError, output_info
from tasks.export import CARD_NAME, run_export

PPL = "ftflow_heldout_ppl.word_perplexity"
CHAT = [{"role": "user", "content": "How do I reset my password?"}]
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def eval_dir(root: Path, passed: bool, score: float = 5371.0, tasks_from: Path | None = None,
             ) -> Path:
    """An evaluate stage dir as tasks/evaluate.py writes it (manifest, comparison.md,
    results.json and, given a tokenizer folder, the lm-eval tasks built from held-out chats)."""
    root.mkdir(parents=True)
    gate = (f"gate {'passed' if passed else 'failed'}: {PPL} (lower is better) base 2.8e+07 "
            f"-> tuned {score:.4g}")
    (root / "comparison.md").write_text(
        "# Base vs tuned on 10 held-out records\n\n| task | metric | base | tuned | delta | better |"
        f"\n|---|---|---|---|---|---|\n| ftflow_heldout_ppl | word_perplexity | 2.8e+07 | "
        f"{score:.4g} | -2.8e+07 | lower |\n\n{gate}\n")
    task, metric = PPL.split(".")
    (root / "results.json").write_text(json.dumps(
        {"base": {task: {metric: 2.8e7}}, "tuned": {task: {metric: score}}}))
    if tasks_from is not None:
        from transformers import AutoTokenizer

        from model_fixtures import support_chats
        from tasks.evaluate import write_tasks

        write_tasks(support_chats(6, seed=3, prefix="e"), AutoTokenizer.from_pretrained(tasks_from),
                    root / "tasks", EvaluateConfig())
    verdict = EvaluateOutput(gate_passed=passed, gate=gate, gate_metric=PPL,
                             results=str(root / "results.json"),
                             comparison=str(root / "comparison.md"))
    Manifest(stage="evaluate", metrics={f"base.{PPL}": 2.8e7, f"tuned.{PPL}": score},
             info=output_info(verdict)).write(root)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, train_dir: Path, session_home: Path,
             ) -> tuple[Manifest, str, MlflowClient, str, Path]:
    """One export of the session's train dir with every format, into a SQLite store."""
    root = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ftflow-test", (root / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    cfg = ExportConfig(model_name="ftflow-test", max_new_tokens=12, system_prompt="Be brief.")
    m = run_export(train_dir, eval_dir(root / "heldout", True, tasks_from=train_dir / "merged"),
                   root / "out", cfg, tracking_uri=uri, parent_run_id=parent,
                   home=root / "home", run_config={"export": cfg.model_dump(mode="json"),
                                                   "augment": {"teacher": {"api_key": "sk-x"}}})
    return m, uri, client, parent, root / "out"


def test_export_registers_a_champion_that_loads_and_chats(exported, train_dir: Path) -> None:
    m, uri, client, parent, out = exported
    before = mlflow.get_tracking_uri()
    m.check()
    assert mlflow.get_tracking_uri() == before and mlflow.active_run() is None
    assert m.info["registered"] is True and m.info["model_uri"] == "models:/ftflow-test@candidate"
    for alias in ("candidate", "champion"):  # the first version that passes is both
        assert str(client.get_model_version_by_alias("ftflow-test", alias).version) == "1"
    mv = client.get_model_version("ftflow-test", "1")
    assert mv.tags["ftflow.gate_passed"] == "True" and mv.tags[f"ftflow.metric.tuned.{PPL}"] == "5371"
    assert mv.tags["ftflow.target_score"] == "5371.0" and mv.tags["ftflow.target_metric"] == PPL
    assert mv.tags["ftflow.champion.action"] == "export" and mv.tags["ftflow.champion.previous"] == "-"
    assert "first version to pass the gate" in m.info["champion"]

    # MLflow 3 lineage: a logged model, output of the export run, behind the registered version
    run = client.get_run(m.info["run_id"])
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent and run.info.status == "FINISHED"
    assert run.data.tags["ftflow.gate_passed"] == "True" and PPL in run.data.tags["ftflow.gate"]
    model_id = m.info["model_id"]
    assert mv.source == f"models:/{model_id}"  # the version is the logged model
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.info.run_id and str(logged.status) in ("READY",
                                                                            "LoggedModelStatus.READY")
    files = {f.path for f in client.list_logged_model_artifacts(model_id, "artifacts/merged")}
    assert "artifacts/merged/model.safetensors" in files
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_table.json"))
                       .read_text())
    assert table["columns"] == ["task.metric", "base", "tuned"] and table["data"] == [
        [PPL, 2.8e7, 5371.0]]

    card = (out / CARD_NAME).read_text()
    for text in ("| word_perplexity | 2.8e+07 | 5371", "Gate decision:** passed", "Base model:",
                 "r=16", "## Data lineage", "train-00000.jsonl.gz", "## Config", "model_name: ftflow-test",
                 "version 1, alias `candidate`", "first version to pass the gate", "gguf/"):
        assert text in card, text
    assert "sk-x" not in card and "<redacted>" in card

    try:
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model("models:/ftflow-test@champion")
    finally:
        mlflow.set_tracking_uri(before)
    replies = model.predict([CHAT])
    assert model.predict(["How do I reset my password?"]) == replies
    # The served reply is the merged model's own greedy reply through its chat template.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_dir / "merged")
    lm = AutoModelForCausalLM.from_pretrained(train_dir / "merged")
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    gen = lm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert replies[0] == tok.decode(gen[0, ids["input_ids"].shape[1]:],
                                    skip_special_tokens=True).strip()


def test_folders_are_portable_and_world_readable(exported, train_dir: Path) -> None:
    *_, out = exported
    for path in [p for d in ("merged", "adapter", "gguf", "lm-eval") for p in (out / d).rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    tok_cfg = json.loads((out / "merged" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["chat_template"] == (out / "merged" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in tok_cfg["additional_special_tokens"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-llama"
    for task_file in (out / "lm-eval").glob("*.yaml"):
        assert str(out) not in task_file.read_text() and "/" not in task_file.read_text().split(
            "data_file:")[1].splitlines()[0]


def test_gguf_reads_back_with_the_gguf_reader(exported, train_dir: Path) -> None:
    from safetensors import safe_open

    from tasks.export_gguf import read_gguf

    *_, out = exported
    with safe_open(str(train_dir / "merged" / "model.safetensors"), "pt") as f:
        n_tensors = len(list(f.keys()))
    tok_cfg = json.loads((train_dir / "merged" / "tokenizer.json").read_text())
    vocab = {t["content"]: t["id"] for t in tok_cfg["added_tokens"]}
    for quant, types in (("f16", ["F16", "F32"]), ("q8_0", ["F32", "Q8_0"])):
        info = read_gguf(out / "gguf" / f"ftflow-test-{quant}.gguf")
        assert info["architecture"] == "llama" and info["tensor_count"] == n_tensors
        assert info["tensor_types"] == types and info["pre"] == "gpt-2"
        assert "<|im_start|>" in info["chat_template"] and "{% generation" not in info["chat_template"]
        assert info["eos_token_id"] == vocab["<|im_end|>"] and info["bos_token_id"] == vocab["<s>"]
        assert info["pad_token_id"] == vocab["<pad>"]
        assert info["tokens"][vocab["<|im_end|>"]] == "<|im_end|>"
    modelfile = (out / "gguf" / "Modelfile").read_text()
    for text in ("FROM ./ftflow-test-q8_0.gguf", 'TEMPLATE """', "<|im_start|>assistant",
                 'PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0.7",
                 "PARAMETER num_ctx", 'SYSTEM """Be brief."""'):
        assert text in modelfile, text


def test_a_tokenizer_llama_cpp_does_not_know_gets_a_clear_message(
        tmp_path: Path, train_dir: Path) -> None:
    from tasks.export_gguf import GGUFExportError, write_gguf

    folder = shutil.copytree(train_dir / "merged", tmp_path / "custom")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(GGUFExportError, match=r"pre-tokenizer .*Whitespace.* not one llama.cpp"):
        write_gguf(folder, tmp_path / "x.gguf", "f16", "", "x")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.slow
def test_lmeval_tasks_run_on_a_copy(exported, tmp_path: Path) -> None:
    """The exported task folder and model, copied elsewhere, run with lm-eval's own CLI and give
    the scores they give where the export wrote them."""
    *_, out = exported
    shutil.copytree(out / "lm-eval", tmp_path / "tasks")
    shutil.copytree(out / "merged", tmp_path / "model")
    (tmp_path / "work").mkdir()

    def lm_eval(model: str, tasks: str, cwd: Path) -> dict:
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={model}", "--include_path", tasks, "--tasks",
               "ftflow_heldout_ppl,ftflow_heldout_mc", "--device", "cpu", "--batch_size", "4",
               "--output_path", "results"]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf")))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads(next((cwd / "results").rglob("results_*.json")).read_text())

    copy = lm_eval("../model", "../tasks", tmp_path / "work")  # relative paths, on the copy
    (tmp_path / "orig").mkdir()
    orig = lm_eval(str(out / "merged"), str(out / "lm-eval"), tmp_path / "orig")
    for task, metric in (("ftflow_heldout_ppl", "word_perplexity,none"),
                         ("ftflow_heldout_mc", "acc,none"),
                         ("ftflow_heldout_mc", "acc_mutual_info,none")):
        assert copy["results"][task][metric] == pytest.approx(orig["results"][task][metric],
                                                              rel=1e-6), (task, metric)
    assert copy["n-samples"]["ftflow_heldout_ppl"]["effective"] == 6


def test_failed_gate_is_not_registered_unless_asked(tmp_path: Path, train_dir: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    ev = eval_dir(tmp_path / "heldout", False)
    cfg = ExportConfig(model_name="held-back", gguf=[])
    m = run_export(train_dir, ev, tmp_path / "out", cfg, tracking_uri=uri, home=tmp_path / "home")
    m.check()
    assert m.info["registered"] is False and m.info["version"] is None
    assert "gate failed" in m.info["reason"] and m.info["model_uri"] == f"models:/{m.info['model_id']}"
    assert client.search_registered_models("name='held-back'") == []
    assert "gate failed" in (tmp_path / "out" / CARD_NAME).read_text()
    # Without a parent run the stage uses its own experiment, artifacts under out_dir.
    run = client.get_run(m.info["run_id"])
    assert MLFLOW_PARENT_RUN_ID not in run.data.tags and run.data.tags["ftflow.registered"] == "False"
    assert str(tmp_path / "out") in run.info.artifact_uri

    forced = run_export(train_dir, ev, tmp_path / "out2",
                        cfg.model_copy(update={"register_if_gate_fails": True}),
                        tracking_uri=uri, home=tmp_path / "home")
    assert forced.info["registered"] is True and "register_if_gate_fails" in forced.info["reason"]
    assert str(client.get_model_version_by_alias("held-back", "candidate").version) == "1"
    # a version whose gate failed never becomes champion
    assert forced.info["champion"] == "champion unchanged: the gate failed"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("held-back", "champion")


def test_a_missing_hand_off_field_names_the_stage_and_field(tmp_path: Path, train_dir: Path,
                                                           ) -> None:
    """A renamed or missing field of an earlier stage fails at once, saying which."""
    ev = eval_dir(tmp_path / "heldout", True)
    m = Manifest.read(ev)
    del m.info["gate_passed"]
    m.write(ev)
    with pytest.raises(StageOutputError, match=r"stage 'evaluate'.*field 'gate_passed'"):
        run_export(train_dir, ev, tmp_path / "out", ExportConfig(),
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", home=tmp_path / "home")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_stage_export_runs_alone_from_the_cli(tmp_path: Path, train_dir: Path) -> None:
    """`ftflow stage export --input RUN/08-train --output DIR`: the evaluate dir beside it."""
    run = tmp_path / "run"
    shutil.copytree(train_dir, run / "08-train")
    eval_dir(run / "09-evaluate", True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "flows.cli", "stage", "export", "--input", str(run / "08-train"),
           "--output", str(run / "10-export"), f"run.tracking_uri={uri}",
           f"run.home={tmp_path / 'home'}", "export.model_name=from-cli", "export.gguf=[]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"-> {run / '10-export'}" in proc.stdout
    m = Manifest.read(run / "10-export")
    assert m.info["model_uri"] == "models:/from-cli@candidate"
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("from-cli", "champion").version) == "1"
    lineage = (run / "10-export" / CARD_NAME).read_text().split("## Data lineage")[1]
    assert "| 08-train |" in lineage and "| 09-evaluate |" in lineage


GENERATE = """
import json, sys
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
text = tok.apply_chat_template(json.loads(sys.argv[2]), tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False)
out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"version": transformers.__version__, "tokenizer": type(tok).__name__,
                  "prompt": text, "ids": out[0, ids["input_ids"].shape[1]:].tolist()}))
"""


@pytest.mark.slow
def test_merged_folder_loads_in_transformers4(exported) -> None:
    """The exported folder loads and chats the same in a venv with transformers 4.57 (built once
    and cached: tests/second_venv.py) as with this venv's transformers 5."""
    from second_venv import transformers4_python

    *_, out = exported
    replies = {}
    for python in (transformers4_python(), Path(sys.executable)):
        proc = subprocess.run([str(python), "-c", GENERATE, str(out / "merged"), json.dumps(CHAT)],
                              capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
        replies[reply["version"].split(".")[0]] = reply
    assert replies["4"]["version"].startswith("4.57") and replies["5"]["version"].startswith("5.")
    assert replies["4"]["tokenizer"] == "PreTrainedTokenizerFast"
    assert replies["4"]["prompt"] == replies["5"]["prompt"] == (
        "<|im_start|>user\nHow do I reset my password?<|im_end|>\n<|im_start|>assistant\n")
    assert replies["4"]["ids"] == replies["5"]["ids"] and len(replies["4"]["ids"]) > 0
