"""The user-trained quality classifier: what it learns, and what ingest drops with it."""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from data_contracts.config import IngestConfig
from data_contracts.records import ChatSample
from flows.cli import main
from tasks.assets import ensure_lid_model
from tasks.ingest import _config_digest, run_ingest
from tasks.io import Quarantined, iter_input, read_records
from tasks.quality import (M_PERTURB, QualityModel, QualityModelError, report_path,
                           train_quality_model)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"

SPAM = ["cheap", "discount", "best price", "free shipping", "buy now", "limited offer",
        "click here", "casino", "bonus", "win big", "crypto", "fast loans", "replica watches",
        "pills", "followers", "100% guaranteed", "act now", "seo", "backlinks", "giveaway"]
BOILERPLATE = [
    "This is an automated message, please do not reply to this email.",
    "Your ticket has been received and will be handled in the order it arrived.",
    "Click here to unsubscribe from these notifications.",
    "All rights reserved. Terms and conditions apply.",
    "This email and any attachments are confidential and intended solely for the addressee.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "Sent from my phone.", "Please rate your support experience from 1 to 10.",
    "Copyright 2026. Privacy policy. Cookie settings. Contact us.",
]


def _bad(rng: random.Random, i: int) -> dict:
    """Keyword stuffing, auto-reply boilerplate or a link-spam answer, in turn."""
    if i % 3 == 0:
        question = " ".join(rng.sample(SPAM, 5)) + "!!!"
        answer = " ".join(rng.sample(SPAM, 8) + rng.sample(SPAM, 6))
    elif i % 3 == 1:
        question = f"{rng.choice(['hello', 'help', 'my order', 'ticket'])} {rng.choice(BOILERPLATE)}"
        answer = " ".join(rng.sample(BOILERPLATE, 3))
    else:
        question = f"best {rng.choice(SPAM)} site {rng.randrange(1000)}"
        site = rng.choice(SPAM).replace(" ", "").replace("%", "")
        answer = (f"Visit www.{site}-{rng.randrange(99)}.biz for {', '.join(rng.sample(SPAM, 3))}."
                  f" {rng.choice(BOILERPLATE)}")
    return {"id": f"bad-{i}", "messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]}


def _good_records() -> list[ChatSample]:
    """Real support exchanges from the bundled sample data, minus what was planted as junk."""
    planted = {(p["file"], p["line"]) for p in json.loads((SAMPLE / "planted.json").read_text())}
    files = [str(SAMPLE / f) for f in ("support_chat.jsonl", "sharegpt.jsonl",
                                       "instructions.jsonl")]
    return [r for r in iter_input(files) if not isinstance(r, Quarantined)
            and (Path(r.source.file).name, r.source.line) not in planted]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def _as_input(rec: ChatSample) -> dict:
    return {"id": rec.id, "messages": [m.model_dump() for m in rec.messages]}


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good.jsonl / bad.jsonl to train on, plus unseen good and bad records for ingest."""
    tmp = tmp_path_factory.mktemp("quality")
    rng = random.Random(7)
    good = [_as_input(r) for r in _good_records()]
    rng.shuffle(good)
    bad = [_bad(rng, i) for i in range(120)]
    return {"good": _write(tmp / "good.jsonl", good[:-20]),
            "bad": _write(tmp / "bad.jsonl", bad[:-21]),
            "unseen_good": _write(tmp / "unseen_good.jsonl", good[-20:]),
            "unseen_bad": _write(tmp / "unseen_bad.jsonl", bad[-21:])}


@pytest.fixture(scope="module")
def model(examples: dict[str, Path]) -> Path:
    out = examples["good"].parent / "quality.bin"
    train_quality_model([examples["good"]], [examples["bad"]], out)
    return out


def test_training_learns_to_separate_and_reports_it(examples: dict[str, Path],
                                                    model: Path) -> None:
    report = json.loads(report_path(model).read_text())
    assert report_path(model) == model.with_name("quality.json")
    n_good = len(examples["good"].read_text().splitlines())
    assert report["examples"] == {"good": n_good, "bad": 99}
    assert report["heldout"]["bad"] == 20 and report["heldout"]["good"] == round(n_good * 0.2)
    assert report["train"]["good"] + report["heldout"]["good"] == n_good
    assert report["heldout_accuracy"] >= 0.95
    assert min(report["heldout_recall"].values()) >= 0.9
    assert report["skipped"] == {"good": 0, "bad": 0}

    clf = QualityModel(model)
    good = list(read_unseen(examples["unseen_good"]))
    bad = list(read_unseen(examples["unseen_bad"]))
    assert min(clf.p_good(good)) > 0.8 and max(clf.p_good(bad)) < 0.2


def read_unseen(path: Path) -> list[ChatSample]:
    return [r for r in iter_input(path) if isinstance(r, ChatSample)]


def test_ingest_drops_low_quality_and_keeps_the_rest(examples: dict[str, Path], model: Path,
                                                     tmp_path: Path, session_home: Path) -> None:
    ensure_lid_model(session_home)
    pairs = [  # a pair is judged on prompt + chosen: a spam rejected reply is what it is for
        {"id": "pair-good-chosen", "prompt": "How do I download my invoices?",
         "chosen": "You can download every invoice as a PDF under Settings > Billing > Invoices.",
         "rejected": "cheap discount best price free shipping buy now limited offer click here"},
        {"id": "pair-spam-chosen", "prompt": "How do I download my invoices?",
         "chosen": "casino bonus win big crypto fast loans replica watches act now giveaway seo",
         "rejected": "You can download every invoice as a PDF under Settings > Billing."},
    ]
    inputs = [str(examples["unseen_good"]), str(examples["unseen_bad"]),
              str(_write(tmp_path / "pairs.jsonl", pairs))]
    # Only the quality filter judges: spam would otherwise fall to language id or Gopher first.
    cfg = IngestConfig(quality_model=str(model), quality_threshold=0.5, languages=[],
                       language_threshold=0.0, gopher_quality=False, gopher_repetition=False)
    m = run_ingest(inputs, tmp_path / "out", cfg, home=session_home).check()

    with gzip.open(tmp_path / "out/filtered.jsonl.gz", "rt") as fh:
        filtered = {d["record"]["id"]: d for d in map(json.loads, fh)}
    bad_ids = {r.id for r in read_unseen(examples["unseen_bad"])}
    assert set(filtered) == bad_ids | {"pair-spam-chosen"}
    assert {d["reason"] for d in filtered.values()} == {"low_quality"}
    assert all(d["p_good"] < 0.5 for d in filtered.values())
    kept = {r.id: r for r in read_records(tmp_path / "out")}
    good_ids = {r.id for r in read_unseen(examples["unseen_good"])}
    assert set(kept) == good_ids | {"pair-good-chosen"}
    assert all(r.meta["quality_p_good"] >= 0.5 for r in kept.values())
    assert m.filtered == {"low_quality": 22} and m.info["quality_model"] == str(model)


def test_retraining_the_model_in_place_reruns_ingest(model: Path, tmp_path: Path) -> None:
    path = tmp_path / "q.bin"
    shutil.copy(model, path)
    cfg = IngestConfig(quality_model=str(path))
    before = _config_digest(cfg, "")
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")  # different bytes, same name
    assert _config_digest(cfg, "") != before != IngestConfig().digest()


def test_too_few_examples_is_a_clear_error(examples: dict[str, Path], tmp_path: Path) -> None:
    few = _write(tmp_path / "few.jsonl", [json.loads(line) for line in
                                          examples["good"].read_text().splitlines()[:4]])
    with pytest.raises(QualityModelError, match="4 usable good examples; at least 10"):
        train_quality_model([few], [examples["bad"]], tmp_path / "q.bin")
    with pytest.raises(QualityModelError, match=r"\.bin or \.ftz"):
        train_quality_model([few], [examples["bad"]], tmp_path / "q.model")


def test_divergence_is_retried_at_a_lower_learning_rate(examples: dict[str, Path],
                                                        tmp_path: Path) -> None:
    # lr=50 makes fastText abort with "Encountered NaN" on this data; halving recovers.
    report = train_quality_model([examples["good"]], [examples["bad"]], tmp_path / "q.bin",
                                 lr=50.0, epochs=5)
    assert report.params["lr"] < 50.0
    assert report.heldout_accuracy is not None and report.heldout_accuracy >= 0.9


def test_a_model_with_other_labels_is_refused(session_home: Path) -> None:
    lid = ensure_lid_model(session_home)
    with pytest.raises(QualityModelError, match="not an ftflow quality model"):
        QualityModel(lid)


def test_cli_trains_a_quantized_model(examples: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "quality.ftz"
    rc = main(["quality-model", "train", "--good", str(examples["good"]), "--bad",
               str(examples["bad"]), "--output", str(out), "--epochs", "10"])
    assert rc == 0
    assert out.is_file() and out.stat().st_size < 2_000_000  # .bin of this model: ~13 MB
    report = json.loads((tmp_path / "models/quality.json").read_text())
    assert report["params"]["quantized"] is True and report["heldout_accuracy"] >= 0.95
    assert "held-out accuracy" in capsys.readouterr().out
    clf = QualityModel(out)
    scores = clf.p_good(read_unseen(examples["unseen_bad"]))
    assert len(scores) == 21 and max(scores) < 0.5, scores
    assert main(["quality-model", "train", "--good", str(examples["good"]), "--bad",
                 str(examples["bad"]), "--output", str(out), "--min-examples", "500"]) == 2


def test_the_same_examples_train_the_same_model_on_a_dirty_heap(examples: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """fastText leaves most of its input matrix uninitialized: a heap full of freed data (a
    long-lived worker, the full test suite) once made the same examples diverge or train a
    worse model. Here every allocation is filled with 0xFE bytes while the second model
    trains, as garbage would be; without zero-filled allocations it aborts with NaN."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    first = train_quality_model([examples["good"]], [examples["bad"]], tmp_path / "a.bin")
    libc.mallopt(M_PERTURB, 0x01)
    try:
        second = train_quality_model([examples["good"]], [examples["bad"]], tmp_path / "b.bin")
    finally:
        libc.mallopt(M_PERTURB, 0)
    assert second.params["lr"] == first.params["lr"] == 0.5  # no divergence, no retry
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert second.heldout_accuracy == first.heldout_accuracy >= 0.95
