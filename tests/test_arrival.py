"""Data arrival: complete new files are announced once, a run reads exactly them, dedups them
against the curated corpus of earlier runs and adds them to it; nothing is lost or run twice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from data_contracts.config import CurateConfig
from data_contracts.manifest import Manifest
from flows.arrival import STATE_NAME, Arrivals
from model_fixtures import support_chats, write_stage_dir
from tasks.curate import latest, run_curate
from tasks.io import read_records

REPO = Path(__file__).resolve().parents[1]


def _drop(inbox: Path, name: str, records: list, age_s: float = 0.0) -> Path:
    """Write a JSONL file into the inbox the way a careful producer does (write, then rename)."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f"{name}.partial"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = inbox / name
    os.replace(tmp, path)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def _chats(n: int, seed: int, prefix: str) -> list[dict]:
    return [{"id": r.id, "messages": [m.model_dump() for m in r.messages]}
            for r in support_chats(n, seed=seed, prefix=prefix)]


def test_a_burst_is_announced_once_when_complete(tmp_path: Path) -> None:
    inbox, home = tmp_path / "inbox", tmp_path / "home"
    arrivals = Arrivals(home)
    now = time.time()
    for i in range(5):
        _drop(inbox, f"batch-{i}.jsonl", _chats(2, i, f"b{i}"))
    (inbox / "half.jsonl.partial").write_text("{")  # still being written
    (inbox / ".hidden.jsonl").write_text("{}\n")
    assert arrivals.scan(inbox, settle_s=5, now=now) == [], "just landed: not yet complete"
    files = arrivals.scan(inbox, settle_s=5, now=now + 6)
    assert [Path(f).name for f in files] == [f"batch-{i}.jsonl" for i in range(5)]
    assert arrivals.scan(inbox, settle_s=5, now=now + 7) == [], "announced once"
    assert not list(inbox.glob("*seen*")) and (home / STATE_NAME).exists(), "state in the home"


def test_a_file_still_growing_holds_the_announcement(tmp_path: Path) -> None:
    inbox, arrivals = tmp_path / "inbox", Arrivals(tmp_path / "home")
    now = time.time()
    a = _drop(inbox, "a.jsonl", _chats(2, 1, "a"))
    arrivals.scan(inbox, settle_s=5, now=now)
    b = _drop(inbox, "b.jsonl", _chats(1, 2, "b"))
    assert arrivals.scan(inbox, settle_s=5, now=now + 6) == [], "b is settling: wait for it"
    with b.open("a") as fh:  # the writer appends more
        fh.write(json.dumps(_chats(1, 3, "c")[0]) + "\n")
    assert arrivals.scan(inbox, settle_s=5, now=now + 9) == []
    assert arrivals.scan(inbox, settle_s=5, now=now + 15) == sorted([str(a), str(b)])


def test_claim_consume_release_never_lose_or_repeat_a_file(tmp_path: Path) -> None:
    inbox, arrivals = tmp_path / "inbox", Arrivals(tmp_path / "home")
    now = time.time()
    a = str(_drop(inbox, "a.jsonl", _chats(2, 1, "a")))
    arrivals.scan(inbox, 0, now)
    assert arrivals.scan(inbox, 0, now + 1) == [a]
    assert arrivals.claim([a], "run-1") == [a]
    assert arrivals.claim([a], "run-2") == [], "a second event for the same file reads nothing"
    arrivals.release([a], "run-1")  # run-1 failed
    assert arrivals.scan(inbox, 0, now + 2) == [a], "announced again at once"
    assert arrivals.claim([a], "run-3") == [a]
    b = str(_drop(inbox, "b.jsonl", _chats(2, 2, "b")))  # lands while run-3 goes on
    arrivals.scan(inbox, 0, now + 3)
    assert arrivals.scan(inbox, 0, now + 4) == [b], "only the new file, for the next run"
    arrivals.consume([a], "run-3")
    assert arrivals.claim([a], "run-4") == [], "consumed: never read again"
    os.utime(a, (now + 100, now + 100))  # touched, same bytes
    arrivals.scan(inbox, 0, now + 5)
    assert a not in arrivals.scan(inbox, 0, now + 6)
    assert arrivals.files()[a]["status"] == "consumed", "the same bytes: still consumed"
    _drop(inbox, "a.jsonl", _chats(3, 9, "a2"))  # new content under the old name
    arrivals.scan(inbox, 0, now + 700)
    assert a in arrivals.scan(inbox, 0, now + 701)


def test_files_of_a_run_that_died_without_a_word_are_pending_again(tmp_path: Path) -> None:
    inbox, arrivals = tmp_path / "inbox", Arrivals(tmp_path / "home")
    now = time.time()
    a = str(_drop(inbox, "a.jsonl", _chats(2, 1, "a")))
    b = str(_drop(inbox, "b.jsonl", _chats(2, 2, "b")))
    arrivals.scan(inbox, 0, now)
    arrivals.scan(inbox, 0, now + 1)
    arrivals.claim([a], "crashed-run")
    arrivals.claim([b], "live-run")
    asked = []
    freed = arrivals.release_dead(lambda run: asked.append(run) or run == "crashed-run")
    assert freed == [a] and sorted(asked) == ["crashed-run", "live-run"]
    assert arrivals.scan(inbox, 0, now + 2) == [a], "announced again for the next run"
    assert arrivals.files()[b]["status"] == "claimed", "a live run keeps its files"


def _dedup_dir(root: Path, n: int, seed: int, prefix: str) -> Path:
    return write_stage_dir(root, support_chats(n, seed=seed, prefix=prefix))


def test_curated_versions_grow_and_training_waits_for_enough_new_records(tmp_path: Path) -> None:
    home, cfg = tmp_path / "home", CurateConfig(min_new_records=10)
    first = run_curate(_dedup_dir(tmp_path / "d1", 12, 1, "x"), tmp_path / "c1", cfg, home=home,
                       dataset="ds", mode="full")
    assert first.info["version"] == 1 and first.info["train"] is True and first.kept == 12
    second = run_curate(_dedup_dir(tmp_path / "d2", 4, 2, "y"), tmp_path / "c2", cfg, home=home,
                        dataset="ds", mode="incremental")
    assert second.info["version"] == 2 and second.kept == 16 and second.records_in == 16
    assert second.info["train"] is True, "version 1 was never trained: 16 new records"
    from tasks.curate import mark_trained

    mark_trained(home, "ds", 2)
    third = run_curate(_dedup_dir(tmp_path / "d3", 3, 3, "z"), tmp_path / "c3", cfg, home=home,
                       dataset="ds", mode="incremental")
    assert third.info["train"] is False and "3 new records" in third.info["train_reason"]
    assert len(list(read_records(tmp_path / "c3"))) == 19
    again = run_curate(_dedup_dir(tmp_path / "d3", 3, 3, "z"), tmp_path / "c3", cfg, home=home,
                       dataset="ds", mode="incremental")
    assert again.started_at == third.started_at and latest(home, "ds")["version"] == 3


@pytest.mark.slow
def test_a_run_on_new_files_reads_only_them_and_dedups_against_the_curated_corpus(
        tmp_path: Path, session_home: Path) -> None:
    """Real Prefect (local mode), the real data stages: two arrivals, each run reads its own
    file, the second dedups against the first's curated records, and neither trains."""
    from flows.pipeline import finetune_pipeline

    home = tmp_path / "home"
    (home / "assets").mkdir(parents=True)
    lid = session_home / "assets" / "lid.176.ftz"
    if lid.exists():
        os.link(lid, home / "assets" / lid.name)
    inbox = tmp_path / "inbox"
    overrides = [f"run.home={home}", "curate.min_new_records=100000", "curate.dataset=support",
                 "dedup.eval_fraction=0.2"]
    a = str(_drop(inbox, "a.jsonl", _chats(30, 1, "a")))
    out1 = finetune_pipeline(str(REPO / "configs" / "demo.yaml"), overrides, "arr-1", files=[a])
    assert out1["trained"] is False and "min_new_records" in out1["reason"]
    run1 = Path(out1["run_dir"])
    assert list(Manifest.read(run1 / "01-ingest").input_digests) == [a]
    assert not (run1 / "05-augment").exists()

    # b repeats five of a's conversations word for word, and brings ten new ones.
    b_records = _chats(30, 1, "a")[:5] + _chats(10, 7, "b")
    b = str(_drop(inbox, "b.jsonl", b_records))
    out2 = finetune_pipeline(str(REPO / "configs" / "demo.yaml"), overrides, "arr-2",
                             files=[a, b])  # a is consumed already: only b is read
    run2 = Path(out2["run_dir"])
    assert list(Manifest.read(run2 / "01-ingest").input_digests) == [b]
    dedup = Manifest.read(run2 / "03-dedup")
    assert dedup.info["corpus_records"] > 0
    kept_a = {r.id for r in read_records(run1 / "03-dedup")} | \
        {r.id for r in read_records(run1 / "03-dedup", "heldout")}
    import gzip

    with gzip.open(run2 / "03-dedup" / "deduplicated.jsonl.gz", "rt") as fh:
        removed = [json.loads(line) for line in fh]
    against_corpus = [r for r in removed if r["dup_of"] in kept_a]
    assert len(against_corpus) >= 4, removed
    curated = Manifest.read(run2 / "04-curate")
    assert curated.info["version"] == 2 and curated.info["from_earlier_versions"] > 0
    assert curated.kept == Manifest.read(run1 / "04-curate").kept + dedup.kept
    assert Arrivals(home).files()[b]["status"] == "consumed"
    out3 = finetune_pipeline(str(REPO / "configs" / "demo.yaml"), overrides, "arr-3", files=[b])
    assert out3["run_id"] is None, "nothing new: no run"
