"""Stage 6: the pretrained demo base, lm-eval base vs tuned, the release gate (target gain,
general regression), lm-eval tasks that are not available offline, and the LLM judge."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from model_fixtures import damaged_train_dir, support_chats, write_stage_dir

from data_contracts.config import EvaluateConfig, PipelineConfig, TeacherConfig
from data_contracts.manifest import Manifest
from data_contracts.stage_outputs import EvaluateOutput, read_output
from tasks.evaluate import MC_TASK, PPL_TASK, PROSE_TASK, check, decide, run_evaluate
from tasks.io import read_records

pytestmark = pytest.mark.usefixtures("torch_one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    return write_stage_dir(root / "data", support_chats(20, seed=20),
                           support_chats(12, seed=21, prefix="h"))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, train_dir: Path,
              home: Path) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("heldout") / "out"
    cfg = EvaluateConfig(max_samples=10, num_choices=3, batch_size=8, general_prose=24)
    return out, run_evaluate(data_dir, train_dir, out, cfg, home=home)


def test_builtin_base_knows_english_better_than_random(home: Path) -> None:
    """The demo base is pretrained: on prose held out of its pretraining it is far better than
    the same architecture at random init; its tokenizer is a standard byte-level BPE."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from tasks.base_model import general_heldout_texts, mean_loss, resolve_base_model

    path = Path(resolve_base_model("builtin:tiny-llama", home))
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    random_init = LlamaForCausalLM(base.config)
    texts = [r["text"] for r in general_heldout_texts(24)]
    pretrained, untrained = mean_loss(base, tok, texts), mean_loss(random_init, tok, texts)
    assert math.exp(pretrained) < math.exp(untrained) / 4, (pretrained, untrained)
    assert math.exp(untrained) > 1000  # random init: about the vocabulary size

    conf = json.loads((path / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in conf["chat_template"]
    spec = json.loads((path / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False,
                                     "trim_offsets": True, "use_regex": True}
    assert spec["decoder"]["type"] == "ByteLevel" and spec["model"]["type"] == "BPE"
    # The held-out prose is not in the pretraining texts.
    from tasks.base_model import split_corpus

    train_texts, _ = split_corpus()
    joined = "\n".join(train_texts)
    assert not any(t in joined for t in texts[:5])


def test_tuned_model_passes_the_gate(evaluated: tuple[Path, Manifest]) -> None:
    out, m = evaluated
    m.check()
    assert (m.records_in, m.kept, m.splits) == (10, 10, {"heldout": 10})
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert m.metrics[f"tuned.{PPL_TASK}.{metric}"] < m.metrics[f"base.{PPL_TASK}.{metric}"]
        assert m.metrics[f"stderr.base.{PPL_TASK}.{metric}"] > 0
    for label in ("base", "tuned"):
        assert 0.0 <= m.metrics[f"{label}.{MC_TASK}.acc"] <= 1.0
        assert m.metrics[f"{label}.{PROSE_TASK}.word_perplexity"] > 1
    assert not any("," in k for k in m.metrics)
    assert m.info["gate_passed"] is True and m.info["gate"].startswith("gate passed: target ")
    assert f"general {PROSE_TASK}.bits_per_byte" in m.info["gate"]
    assert m.metrics[f"stderr.base.{PROSE_TASK}.bits_per_byte"] > 0
    assert m.metrics[f"gate.target.{PPL_TASK}.word_perplexity.change"] > 0
    assert m.info["mlflow_tags"] == {"gate.decision": "passed", "gate.reason": m.info["gate"]}
    _, verdict = read_output(out, EvaluateOutput)
    assert verdict.target_score == m.metrics[f"tuned.{PPL_TASK}.word_perplexity"]
    assert verdict.higher_is_better is False and verdict.gate_metric == f"{PPL_TASK}.word_perplexity"


def test_reports_and_task_files(evaluated: tuple[Path, Manifest], data_dir: Path) -> None:
    out, m = evaluated
    results = json.loads((out / "results.json").read_text())
    assert set(results["base"]) == set(results["tuned"]) == {PPL_TASK, MC_TASK, PROSE_TASK}
    assert [c["kind"] for c in results["gate"]["checks"]] == ["target", "general"]
    text = (out / "comparison.md").read_text()
    assert m.info["gate"] in text
    assert "| task | metric | base | tuned | delta | better | gate |" in text
    row = next(line for line in text.splitlines()
               if line.startswith(f"| {PPL_TASK} | word_perplexity |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    base, tuned = (float(c.split("±")[0]) for c in cells[2:4])
    assert tuned < base and "±" in cells[2] and cells[4].startswith("-") and cells[6] == "target"
    assert f"| general | {PROSE_TASK}.bits_per_byte |" in text
    # The multiple-choice items: the true last reply is among distractors from other records.
    heldout = {r.id: r for r in read_records(data_dir, "heldout")}
    rows = [json.loads(x) for x in (out / "tasks" / f"{MC_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and (out / "tasks" / f"{MC_TASK}.yaml").exists()
    for row in rows:
        rec = heldout[row["id"]]
        assert len(row["choices"]) == 3 and len(set(row["choices"])) == 3
        assert row["choices"][row["label"]] == rec.messages[-1].content
        assert row["context"].endswith("<|im_end|>\n")  # the conversation, then the delimiter
        assert rec.messages[0].content in row["context"]
    # Each reply follows the generation prompt; acc_mutual_info also scores it without the
    # conversation (lm-eval's ("", delimiter + reply) requests).
    spec = yaml.safe_load((out / "tasks" / f"{MC_TASK}.yaml").read_text())
    assert spec["target_delimiter"] == "<|im_start|>assistant\n"
    assert [e["metric"] for e in spec["metric_list"]] == ["acc", "acc_norm", "acc_mutual_info"]
    for label in ("base", "tuned"):
        assert f"{label}.{MC_TASK}.acc_mutual_info" in m.metrics
        assert f"stderr.{label}.{MC_TASK}.acc_mutual_info" in m.metrics
    prose = (out / "tasks" / f"{PROSE_TASK}.jsonl").read_text().splitlines()
    assert len(prose) == 24 and "<|im_start|>" not in prose[0]
    assert list(read_records(out, "heldout")) == list(heldout.values())[:10]


@pytest.fixture(scope="module")
def degraded_train_dir(tmp_path_factory: pytest.TempPathFactory, train_dir: Path) -> Path:
    """The tuned model with its weights damaged, as a broken merge or quantization would leave
    it; a train manifest that points to it."""
    return damaged_train_dir(tmp_path_factory.mktemp("degraded"), train_dir)


def test_gate_fails_on_regression_for_a_damaged_model(
        tmp_path: Path, data_dir: Path, degraded_train_dir: Path, home: Path) -> None:
    cfg = EvaluateConfig(max_samples=10, num_choices=3, general_prose=24)  # the default bounds
    m = run_evaluate(data_dir, degraded_train_dir, tmp_path / "out", cfg, home=home)
    gate = m.info["gate"]
    assert m.info["gate_passed"] is False and gate.startswith("gate failed: ")
    base = m.metrics[f"base.{PROSE_TASK}.bits_per_byte"]
    tuned = m.metrics[f"tuned.{PROSE_TASK}.bits_per_byte"]
    assert tuned > base * 1.10  # the forgetting the gate is for
    assert f"regressed: general {PROSE_TASK}.bits_per_byte" in gate
    assert f"{base:.4g}" in gate and f"{tuned:.4g}" in gate and "allowed >= -10.0%" in gate
    assert m.info["mlflow_tags"]["gate.decision"] == "failed"
    assert "NO" in (tmp_path / "out" / "comparison.md").read_text()


def test_gate_fails_when_tuned_is_the_base_model(tmp_path: Path, data_dir: Path,
                                                train_dir: Path, home: Path) -> None:
    same = tmp_path / "same-train"
    info = {**Manifest.read(train_dir).info}
    info["merged_dir"] = info["base_model"]
    same.mkdir()
    Manifest(stage="train", info=info).write(same)
    cfg = EvaluateConfig(max_samples=4, num_choices=2, general_prose=0)
    m = run_evaluate(data_dir, same, tmp_path / "out", cfg, home=home)
    m.check()
    assert m.info["gate_passed"] is False
    assert m.info["gate"].startswith(f"gate failed: did not gain enough: target {PPL_TASK}")
    base, tuned = m.metrics[f"base.{PPL_TASK}.word_perplexity"], \
        m.metrics[f"tuned.{PPL_TASK}.word_perplexity"]
    assert base == pytest.approx(tuned)


def test_gate_direction_and_bounds() -> None:
    base = {PPL_TASK: {"word_perplexity": 100.0}, MC_TASK: {"acc": 0.5},
            PROSE_TASK: {"word_perplexity": 50.0, "word_perplexity_stderr": 2.0}}
    tuned = {PPL_TASK: {"word_perplexity": 80.0}, MC_TASK: {"acc": 0.4},
             PROSE_TASK: {"word_perplexity": 55.0, "word_perplexity_stderr": 3.0}}
    assert check("target", PPL_TASK, "word_perplexity", base, tuned, 0.1).passed
    assert not check("target", PPL_TASK, "word_perplexity", base, tuned, 0.25).passed
    acc = check("target", MC_TASK, "acc", base, tuned, 0.0)
    assert not acc.passed and acc.change == pytest.approx(-0.1)  # points, not relative
    assert "higher is better" in acc.describe() and "-10.0 pts" in acc.describe()
    assert check("target", MC_TASK, "acc", tuned, base, 0.1).passed
    assert not check("target", MC_TASK, "acc", tuned, base, 0.11).passed
    assert not check("target", MC_TASK, "acc", base, {}, 0.0).passed
    prose = check("general", PROSE_TASK, "word_perplexity", base, tuned, 0.05)
    assert not prose.passed and prose.change == pytest.approx(-0.1)
    assert check("general", PROSE_TASK, "word_perplexity", base, tuned, 0.1).passed
    assert "50±2 -> 55±3" in prose.describe()
    ok, text = decide([check("target", PPL_TASK, "word_perplexity", base, tuned, 0.1), prose])
    assert not ok and text == f"gate failed: regressed: {prose.describe()}"
    assert decide([], None)[0] is False  # no target, no pass
    judged = decide([check("target", PPL_TASK, "word_perplexity", base, tuned, 0.1)],
                    {"win_rate": 0.4, "judgments": 10}, min_win_rate=0.5)
    assert judged[0] is False and "judge win rate 40.0% below 50.0%" in judged[1]


def test_accuracy_targets_gain_in_points_and_beyond_their_stderr() -> None:
    """An accuracy gains in absolute points (0.2 -> 0.3 is +10 points, not +50%), and a target
    must gain min_gain_stderrs standard errors of the difference: chance-level noise is no gain."""
    base = {MC_TASK: {"acc_mutual_info": 0.2, "acc_mutual_info_stderr": 0.13}}
    noisy = {MC_TASK: {"acc_mutual_info": 0.3, "acc_mutual_info_stderr": 0.15}}
    real = {MC_TASK: {"acc_mutual_info": 0.9, "acc_mutual_info_stderr": 0.1}}
    c = check("target", MC_TASK, "acc_mutual_info", base, noisy, 0.05, 1.0)
    assert c.change == pytest.approx(0.1) and c.diff_stderr == pytest.approx(math.hypot(.13, .15))
    assert not c.passed  # +10 points, but the difference's stderr is 0.2
    assert "+10.0 pts (needed >= +5.0 pts and >= 1 stderr of the difference (0.2))" in c.describe()
    assert check("target", MC_TASK, "acc_mutual_info", base, noisy, 0.05, 0.0).passed
    assert check("target", MC_TASK, "acc_mutual_info", base, real, 0.05, 1.0).passed
    assert not check("target", MC_TASK, "acc_mutual_info", base, real, 0.75, 1.0).passed
    # Without a stderr the rule is not applied; a general task is never held to it.
    assert check("target", MC_TASK, "acc", {MC_TASK: {"acc": 0.2}}, {MC_TASK: {"acc": 0.3}},
                 0.05, 3.0).passed
    assert check("general", MC_TASK, "acc_mutual_info", real, noisy, 0.7, 5.0).passed
    # A perplexity gains relative to the base, held to min_gain only (its bootstrap stderr over
    # a few documents is on an exponential scale).
    ppl = check("target", PPL_TASK, "word_perplexity",
                {PPL_TASK: {"word_perplexity": 100.0, "word_perplexity_stderr": 30.0}},
                {PPL_TASK: {"word_perplexity": 80.0, "word_perplexity_stderr": 30.0}}, 0.1, 1.0)
    assert ppl.change == pytest.approx(0.2) and ppl.passed and ppl.min_stderrs == 0
    assert "stderr of the difference" not in ppl.describe()


def test_old_gate_keys_still_load() -> None:
    cfg = PipelineConfig.model_validate({"evaluate": {
        "gate_metric": f"{MC_TASK}.acc", "gate_min_improvement": 0.05}})
    assert cfg.evaluate.targets == [f"{MC_TASK}.acc"] and cfg.evaluate.min_gain == 0.05
    with pytest.raises(ValueError, match="gate_metric was renamed evaluate.targets"):
        EvaluateConfig.model_validate({"gate_metric": f"{MC_TASK}.acc",
                                       "targets": [f"{PPL_TASK}.word_perplexity"]})
    with pytest.raises(ValueError, match="must be one of"):
        EvaluateConfig(targets=["nope.acc"])


@pytest.mark.slow
def test_lm_eval_tasks_run_when_offline_and_are_skipped_with_the_reason_otherwise(
        tmp_path: Path, data_dir: Path, train_dir: Path, home: Path) -> None:
    """A task of the user's own include path runs as a general task; a hub task whose data is
    not in the local cache and an unknown name are skipped, each with its reason."""
    include = tmp_path / "my-tasks"
    include.mkdir()
    rows = [{"q": f"Is {n} an even number?", "a": ["no", "yes"][n % 2 == 0]} for n in range(12)]
    (include / "parity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (include / "parity.yaml").write_text(
        "task: my_parity\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {include / 'parity.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: ['no', 'yes']\ndoc_to_target: \"{{['no', 'yes'].index(a)}}\"\n"
        "metric_list:\n  - metric: acc\n")
    cfg = EvaluateConfig(max_samples=4, num_choices=2, general_prose=0, max_regression=1.0,
                         lm_eval_tasks=["my_parity", "arc_easy", "no_such_task"],
                         lm_eval_include_path=str(include))
    m = run_evaluate(data_dir, train_dir, tmp_path / "out", cfg, home=home)
    skipped = m.info["skipped_tasks"]
    assert set(skipped) == {"arc_easy", "no_such_task"}
    assert "not available offline" in skipped["arc_easy"]
    assert "not an lm-eval task" in skipped["no_such_task"]
    assert 0.0 <= m.metrics["tuned.my_parity.acc"] <= 1.0 and "general my_parity.acc" in m.info["gate"]
    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "## Skipped lm-eval tasks" in text and "`arc_easy`: its data is not available" in text


class _JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions judge: deterministic, it prefers the reply
    that shares more words with the reference reply (ties: T)."""

    calls: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                 "body": body})
        prompt = body["messages"][-1]["content"]
        ref = prompt.split("Reference reply:\n", 1)[1].split("\n\nReply A:\n", 1)[0]
        a = prompt.split("\n\nReply A:\n", 1)[1].split("\n\nReply B:\n", 1)[0]
        b = prompt.split("\n\nReply B:\n", 1)[1].split("\n\nWhich reply", 1)[0]
        words = set(ref.lower().split())
        sa, sb = len(words & set(a.lower().split())), len(words & set(b.lower().split()))
        letter = "A" if sa > sb else "B" if sb > sa else "T"
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop", "message": {
                               "role": "assistant", "content": letter}}]}).encode()
        self.send_response(200 if self.path == "/v1/chat/completions" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _JudgeHandler.calls = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_llm_judge_win_rate_from_a_local_endpoint(tmp_path: Path, data_dir: Path,
                                                  train_dir: Path, home: Path,
                                                  judge_server: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret-123")
    teacher = TeacherConfig(kind="openai", model="judge-1", base_url=judge_server,
                            api_key_env="JUDGE_KEY")
    cfg = EvaluateConfig.model_validate({"max_samples": 4, "num_choices": 2, "general_prose": 0,
                                         "judge": {"enabled": True, "max_prompts": 4,
                                                   "max_new_tokens": 16, "min_win_rate": 0.9}})
    out = tmp_path / "out"
    m = run_evaluate(data_dir, train_dir, out, cfg, home=home, judge_teacher=teacher)
    calls = _JudgeHandler.calls
    assert len(calls) == 8 and m.metrics["judge.judgments"] == 8  # 4 prompts, both orders
    assert {c["path"] for c in calls} == {"/v1/chat/completions"}
    assert {c["auth"] for c in calls} == {"Bearer sk-test-secret-123"}
    assert calls[0]["body"]["model"] == "judge-1"
    # Every verdict is the endpoint's answer, mapped back through the swap to base or tuned.
    rows = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and [r["tuned_is"] for r in rows] == ["A", "B"] * 4
    for row in rows:
        reference = next(r for r in read_records(data_dir, "heldout")
                         if r.id == row["id"]).messages[-1].content
        words = set(reference.lower().split())
        tuned, base = (len(words & set(row[k].lower().split())) for k in ("tuned", "base"))
        assert row["winner"] == ("tuned" if tuned > base else "base" if base > tuned else "tie")
    wins = sum(r["winner"] == "tuned" for r in rows)
    ties = sum(r["winner"] == "tie" for r in rows)
    assert m.metrics["judge.wins"] == wins and m.metrics["judge.ties"] == ties
    assert m.metrics["judge.win_rate"] == pytest.approx((wins + 0.5 * ties) / 8)
    rate = m.metrics["judge.win_rate"]
    assert f"judge win rate {rate:.1%} over 8 judgments" in m.info["gate"]
    assert m.info["gate_passed"] is (rate >= 0.9)  # evaluate.judge.min_win_rate
    if rate < 0.9:
        assert f"judge win rate {rate:.1%} below 90.0%" in m.info["gate"]
    assert "## LLM judge" in (out / "comparison.md").read_text()
    for path in out.rglob("*"):
        if path.is_file():
            assert "sk-test-secret-123" not in path.read_text(errors="replace")


@pytest.mark.slow
def test_stage_command_runs_evaluate_alone_on_a_train_dir(tmp_path: Path, train_dir: Path,
                                                          home: Path) -> None:
    """`ftflow stage evaluate --input TRAIN_DIR --output DIR`: the train stage directory holds
    the held-out split and the model; run from outside the repository as a user would."""
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "evaluate", "--input", str(train_dir),
         "--output", str(out), f"run.home={home}", "evaluate.max_samples=4",
         "evaluate.general_prose=8", "evaluate.num_choices=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"-> {out}" in proc.stdout and "gate passed" in proc.stdout
    m = Manifest.read(out)
    assert m.kept == 4 and m.info["gate_passed"] is True


def test_demo_printout_shows_target_general_and_the_gate_in_one_line(
        evaluated: tuple[Path, Manifest]) -> None:
    from rich.console import Console

    from flows.report import print_summary

    _, m = evaluated
    out = {"ledger": {"09-evaluate": m.model_dump(mode="json")}, "run_id": "r1",
           "tracking_uri": "sqlite:///mlflow.db", "mlflow_run_id": "abc",
           "mlflow_experiment_id": "1", "run_dir": "/tmp/r1"}
    console = Console(record=True, width=160)
    print_summary(out, PipelineConfig(), console)
    lines = console.export_text().splitlines()
    target = next(line for line in lines if f"{PPL_TASK}.word_perplexity" in line)
    general = next(line for line in lines if f"{PROSE_TASK}.bits_per_byte" in line)
    assert target.split()[1] == "target" and general.split()[1] == "general"
    base = m.metrics[f"base.{PPL_TASK}.word_perplexity"]
    assert f"{base:.4g}" in target and "±" in target and "%" in target
    gate = [line for line in lines if line.startswith("gate: ")]
    assert gate == [f"gate: {m.info['gate']}"]  # the whole reasoning, one line
