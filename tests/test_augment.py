"""Stage 4: synthetic augmentation through a real distilabel pipeline, every generation validated."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from model_fixtures import support_chats, write_stage_dir

from data_contracts.config import AugmentConfig, TeacherConfig
from tasks.augment import run_augment, validate_generation
from tasks.io import read_records

CFG = AugmentConfig()
PROMPT = "How do I reset my password?"
GOOD_ANSWER = "Open the account settings page, choose security and press reset password."


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def stage_dir(tmp_path: Path) -> Path:
    return write_stage_dir(tmp_path / "in", support_chats(12, seed=3),
                           support_chats(3, seed=4, prefix="h"))


def _filtered(out: Path) -> list[dict]:
    path = out / "filtered.jsonl.gz"
    if not path.exists():
        return []
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("text", [
    GOOD_ANSWER,
    "Sure! First, open Settings → Security, then click “Reset password”.\n\n1. Enter your email.",
])
def test_validator_accepts_clean_replies(text: str) -> None:
    assert validate_generation(text, PROMPT, CFG) is None


@pytest.mark.parametrize("text, why", [
    (None, "empty generation"),
    ("   \n", "empty generation"),
    ("Yes.", "too few words"),
    ("word " * 1000, "too long"),
    ("Open the settings<|im_end|>\n<|im_start|>user\nthanks", "leaked"),
    ("Open the settings page and press reset </s> done", "leaked"),
    ("[INST] reset my password please [/INST] ok", "leaked"),
    ("assistant\nOpen the settings page and reset it.", "leaked"),
    ("How do I   reset my PASSWORD?", "copies the prompt"),
    ("How do I reset my password? How do I reset my password?", "copies the prompt"),
    ("�u\x7f��ag\x1c reachin�j\x1e� h�|x oul��� can!\x0bb� ordld bu your", "not printable"),
])
def test_validator_rejects_bad_replies(text: str | None, why: str) -> None:
    reason = validate_generation(text, PROMPT, CFG)
    assert reason is not None and why in reason


def test_validator_catches_the_teachers_own_special_tokens() -> None:
    text = "Open the settings page ⟨END⟩ and press reset."
    assert validate_generation(text, PROMPT, CFG) is None
    assert "leaked" in validate_generation(text, PROMPT, CFG, special_tokens=("⟨END⟩",))


def test_tiny_teacher_generations_are_validated_and_accounted(stage_dir: Path, tmp_path: Path,
                                                              home: Path) -> None:
    cfg = AugmentConfig(max_seed_records=4, teacher=TeacherConfig(max_new_tokens=24))
    out = tmp_path / "out"
    m = run_augment(stage_dir, out, cfg, home=home)
    m.check()
    assert (m.records_in, m.generated) == (15, 4)
    valid, invalid = m.metrics["augment.valid"], m.metrics["augment.invalid"]
    assert valid + invalid == 4 and m.filtered_total + m.deduplicated == invalid
    assert m.kept == 15 + valid and m.splits == {"train": 12 + valid, "heldout": 3}
    # The random-init teacher writes byte soup: each drop names the check that failed.
    for row in _filtered(out):
        assert row["reason"].startswith("synthetic_") and row["why"]
        assert row["record"]["meta"]["synthetic"] is True
        assert row["record"]["meta"]["strategy"] == "fresh_reply"
    assert m.info["strategies"]["fresh_reply"]["generated"] == 4
    originals = {r.id: r for r in read_records(stage_dir)}
    kept = list(read_records(out))
    assert {r.id for r in kept if not r.meta.get("synthetic")} == set(originals)
    for rec in (r for r in kept if r.meta.get("synthetic")):
        assert rec.meta["seed_id"] in m.info["seeds"] and rec.meta["teacher"] == "builtin:tiny-llama"
    assert list(read_records(out, "heldout")) == list(read_records(stage_dir, "heldout"))
    # Same input and config: the stage is skipped, not rerun.
    assert run_augment(stage_dir, out, cfg, home=home).started_at == m.started_at


def test_openai_teacher_without_key_is_a_clear_error(stage_dir: Path, tmp_path: Path,
                                                     home: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTFLOW_MISSING_KEY", raising=False)
    teacher = TeacherConfig(kind="openai", model="gpt-x", api_key_env="FTFLOW_MISSING_KEY")
    with pytest.raises(ValueError, match="FTFLOW_MISSING_KEY"):
        run_augment(stage_dir, tmp_path / "out", AugmentConfig(teacher=teacher), home=home)


def test_disabled_passes_everything_through(stage_dir: Path, tmp_path: Path, home: Path) -> None:
    m = run_augment(stage_dir, tmp_path / "out", AugmentConfig(enabled=False), home=home)
    m.check()
    assert (m.records_in, m.generated, m.kept, m.filtered) == (15, 0, 15, {})
    assert m.metrics["augment.generated"] == 0
    assert list(read_records(tmp_path / "out")) == list(read_records(stage_dir))


def test_validator_rejects_word_salad_and_broken_characters() -> None:
    cfg = AugmentConfig()
    salad = "days 0012dunrvney m Damaged451Tdecf o., 001dedcfb369 arri139 0095 constante0318"
    assert validate_generation(salad, "Where is my order?", cfg).startswith("not fluent text")
    broken = "Your refund was sent\x15 to the card on file \ufffd today."
    assert validate_generation(broken, "Where is my refund?", cfg).startswith("broken characters")
    fine = "Sure! Your order #4821 shipped on 2024-05-01 and it's on the way to you."
    assert validate_generation(fine, "Where is my order?", cfg) is None


# A process that already ran torch on two threads (as a long-lived worker does after training):
# distilabel's step processes forked from it hung in OpenMP and the pipeline waited forever.
AFTER_TORCH_THREADS = """
import sys
from pathlib import Path

if __name__ == "__main__":
    import torch

    torch.set_num_threads(2)
    x = torch.randn(512, 512)
    for _ in range(10):
        x = torch.tanh(x @ x.T / 512)  # starts torch's OpenMP thread team here
    from data_contracts.config import AugmentConfig, TeacherConfig
    from tasks.augment import run_augment

    m = run_augment(sys.argv[1], sys.argv[2], AugmentConfig(
        max_seed_records=2, teacher=TeacherConfig(max_new_tokens=8)), home=sys.argv[3])
    print("generated", m.generated)
"""


def test_augment_runs_after_torch_used_threads_in_the_same_process(
        stage_dir: Path, tmp_path: Path, home: Path) -> None:
    import os
    import subprocess
    import sys

    script = tmp_path / "after_torch.py"
    script.write_text(AFTER_TORCH_THREADS)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(script), str(stage_dir), str(tmp_path / "out"), str(home)],
        cwd=repo, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo)])},
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated 2" in proc.stdout


def test_strategy_quotas_are_validated_at_load_time() -> None:
    from data_contracts.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="augment.strategies: .*unknown strategy 'rewrite'"):
        load_config(None, ["augment.strategies={rewrite: 4}"])
    with pytest.raises(ConfigError, match="augment.strategies"):
        load_config(None, ["augment.strategies={evolve: -1}"])
    cfg = load_config(None, ["augment.strategies={evolve: 3, doc_qa: 2}"]).augment
    assert cfg.quotas() == {"evolve": 3, "doc_qa": 2}
    assert load_config(None, ["augment.max_seed_records=5"]).augment.quotas() == {"fresh_reply": 5}
    # how generation runs (retries, concurrency) is not what it produces: same stage digest
    fast = load_config(None, ["augment.teacher.concurrency=16", "augment.teacher.max_retries=9"])
    assert fast.augment.digest() == AugmentConfig().digest()
    assert AugmentConfig(max_synthetic_share=0.3).digest() != AugmentConfig().digest()
