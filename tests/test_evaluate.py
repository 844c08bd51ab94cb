"""Stage 6: lm-eval base vs tuned on held-out data, comparison table and promotion gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_fixtures import support_chats, write_stage_dir

from data_contracts.config import EvaluateConfig
from data_contracts.manifest import Manifest
from tasks.evaluate import MC_TASK, PPL_TASK, gate, run_evaluate
from tasks.io import read_records


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    return write_stage_dir(root / "data", support_chats(20, seed=20),
                           support_chats(12, seed=21, prefix="h"))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, train_dir: Path,
              home: Path) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("heldout") / "out"
    cfg = EvaluateConfig(max_samples=10, num_choices=3, batch_size=8)
    return out, run_evaluate(data_dir, train_dir, out, cfg, home=home)


def test_tuned_model_beats_base_on_heldout_perplexity(evaluated: tuple[Path, Manifest]) -> None:
    out, m = evaluated
    m.check()
    assert (m.records_in, m.kept, m.splits) == (10, 10, {"heldout": 10})
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert m.metrics[f"tuned.{PPL_TASK}.{metric}"] < m.metrics[f"base.{PPL_TASK}.{metric}"]
    for label in ("base", "tuned"):
        assert 0.0 <= m.metrics[f"{label}.{MC_TASK}.acc"] <= 1.0
    assert not any("," in k or "stderr" in k for k in m.metrics)
    assert m.info["gate_passed"] is True and "gate passed" in m.info["gate"]
    assert m.metrics["gate.relative_improvement"] > 0


def test_reports_and_task_files(evaluated: tuple[Path, Manifest], data_dir: Path) -> None:
    out, m = evaluated
    results = json.loads((out / "results.json").read_text())
    assert set(results["base"]) == set(results["tuned"]) == {PPL_TASK, MC_TASK}
    table = (out / "comparison.md").read_text()
    assert "| task | metric | base | tuned | delta |" in table
    row = next(line for line in table.splitlines() if "| word_perplexity |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) < float(cells[2]) and cells[4].startswith("-")
    assert m.info["gate"] in table
    # The multiple-choice items: the true last reply is among distractors from other records.
    heldout = {r.id: r for r in read_records(data_dir, "heldout")}
    rows = [json.loads(x) for x in (out / "tasks" / f"{MC_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and (out / "tasks" / f"{MC_TASK}.yaml").exists()
    for row in rows:
        rec = heldout[row["id"]]
        assert len(row["choices"]) == 3 and len(set(row["choices"])) == 3
        assert row["choices"][row["label"]] == rec.messages[-1].content
        assert row["context"].endswith("<|im_start|>assistant\n")
        assert rec.messages[0].content in row["context"]
    assert list(read_records(out, "heldout")) == list(heldout.values())[:10]


def test_gate_fails_when_tuned_is_the_base_model(tmp_path: Path, data_dir: Path,
                                                train_dir: Path, home: Path) -> None:
    same = tmp_path / "same-train"
    info = {**Manifest.read(train_dir).info}
    info["merged_dir"] = info["base_model"]
    same.mkdir()
    Manifest(stage="train", info=info).write(same)
    cfg = EvaluateConfig(max_samples=4, num_choices=2)
    m = run_evaluate(data_dir, same, tmp_path / "out", cfg, home=home)
    m.check()
    assert m.info["gate_passed"] is False and "gate failed" in m.info["gate"]
    base, tuned = m.metrics[f"base.{PPL_TASK}.word_perplexity"], \
        m.metrics[f"tuned.{PPL_TASK}.word_perplexity"]
    assert base == pytest.approx(tuned)


def test_gate_direction_and_threshold() -> None:
    base = {PPL_TASK: {"word_perplexity": 100.0}, MC_TASK: {"acc": 0.5}}
    tuned = {PPL_TASK: {"word_perplexity": 80.0}, MC_TASK: {"acc": 0.4}}
    assert gate(base, tuned, f"{PPL_TASK}.word_perplexity", 0.1)[0] is True
    assert gate(base, tuned, f"{PPL_TASK}.word_perplexity", 0.25)[0] is False
    passed, rel, text = gate(base, tuned, f"{MC_TASK}.acc", 0.0)
    assert passed is False and rel == pytest.approx(-0.2) and "higher is better" in text
    assert gate(tuned, base, f"{MC_TASK}.acc", 0.2)[0] is True
    assert gate(base, {}, f"{MC_TASK}.acc", 0.0)[0] is False


def test_preference_pairs_put_the_rejected_reply_among_the_choices(home: Path) -> None:
    from transformers import AutoTokenizer

    from data_contracts.records import parse_record
    from tasks.base_model import resolve_base_model
    from tasks.evaluate import mc_items

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("builtin:tiny-llama", home))
    pairs = [parse_record({"prompt": f"Question {i}?", "chosen": f"Good answer {i}.",
                           "rejected": f"Bad answer {i}."}) for i in range(6)]
    items = mc_items(pairs, tokenizer, num_choices=3, seed=0)
    assert len(items) == 6
    for i, item in enumerate(items):
        assert item["choices"][item["label"]] == f"Good answer {i}."
        assert f"Bad answer {i}." in item["choices"]  # the pair's own rejected reply
        assert len(item["choices"]) == 3
        assert f"Question {i}?" in item["context"] and "Good answer" not in item["context"]
