"""The strategies, mixed with quotas, against a real OpenAI-compatible server on 127.0.0.1:
provenance on every row, validation with a reason for every rejection, the synthetic share
cap, and held-out records never used as seeds."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from model_fixtures import support_chats, write_stage_dir
from teacher_server import TeacherServer

from data_contracts.config import AugmentConfig, SyntheticJudgeConfig, TeacherConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, Message
from tasks.augment import run_augment, synthetic_cap, trim_quotas
from tasks.augment_strategies import template_digest
from tasks.io import read_records

KEY_ENV = "FTFLOW_TEST_TEACHER_KEY"
DOCS = [
    "Orders ship from our warehouse within two business days. Tracking numbers are emailed "
    "as soon as the parcel leaves, and deliveries usually take three to five days.",
    "Refunds are issued to the original payment method. Card refunds take up to ten days to "
    "appear, while store credit is available immediately after approval.",
    "Two step sign in protects your account. Turn it on in the security settings and keep the "
    "backup codes somewhere safe in case you lose your phone.",
]


def _rows(path: Path, name: str) -> list[dict[str, Any]]:
    file = path / name
    if not file.exists():
        return []
    with gzip.open(file, "rt") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 support chats in two domains, 3 documents; 4 held-out chats with a marker word."""
    chats = []
    for i, c in enumerate(support_chats(30, seed=5)):
        domain = "billing" if i % 2 else "account"
        chats.append(ChatSample(id=f"s{i}", meta={"domain": domain}, messages=[
            Message(role="user", content=f"{c.messages[0].content} (case {i}, {domain})"),
            c.messages[1]]))
    docs = [ChatSample(id=f"d{i}", text=t) for i, t in enumerate(DOCS)]
    heldout = [ChatSample(id=f"h{i}", messages=[
        Message(role="user", content=f"HELDOUTMARKER question {i} about my parcel?"),
        Message(role="assistant", content="It is on the way and arrives on Friday.")])
        for i in range(4)]
    return write_stage_dir(tmp_path_factory.mktemp("strat") / "in", chats + docs, heldout)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeacherServer]:
    srv = TeacherServer(tmp_path_factory.mktemp("srv")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mixed(stage_dir: Path, server: TeacherServer, session_home: Path,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path, AugmentConfig]:
    """One run of every strategy with the judge on."""
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, "sk-anything")
    tmp = tmp_path_factory.mktemp("mixed")
    home = tmp / "home"
    shutil.copytree(session_home / "assets", home / "assets")
    cfg = AugmentConfig(
        strategies={"fresh_reply": 4, "paraphrase": 3, "evolve": 3, "self_instruct": 3,
                    "doc_qa": 3, "preference": 2},
        judge=SyntheticJudgeConfig(enabled=True, min_score=3),
        teacher=TeacherConfig(kind="openai", model="fake-gpt", base_url=server.url,
                              api_key_env=KEY_ENV, max_new_tokens=24, backoff_s=0.05))
    out = tmp / "out"
    try:
        m = run_augment(stage_dir, out, cfg, home=home, base_model="builtin:tiny-llama")
    finally:
        mp.undo()
    return m, out, cfg


def test_every_strategy_generates_its_quota_and_the_ledger_adds_up(mixed: tuple) -> None:
    m, out, cfg = mixed
    m.check()
    per = m.info["strategies"]
    assert {k: v["generated"] for k, v in per.items()} == cfg.strategies
    for name, v in per.items():
        assert v["accepted"] + sum(v["rejected"].values()) == v["generated"], name
        assert m.metrics[f"augment.{name}.generated"] == v["generated"]
    rejected_by_reason: dict[str, int] = {}
    for v in per.values():
        for reason, n in v["rejected"].items():
            rejected_by_reason[reason] = rejected_by_reason.get(reason, 0) + n
    dups = rejected_by_reason.pop("near_duplicate", 0)
    assert rejected_by_reason == m.filtered and dups == m.deduplicated
    # the judge (server side: every answer about refunds scores 2) rejected some rows
    assert rejected_by_reason.get("synthetic_judge", 0) >= 1
    for row in _rows(out, "filtered.jsonl.gz"):
        assert row["why"] and row["strategy"] in cfg.strategies



def test_ledger_md_has_a_row_per_strategy(mixed: tuple) -> None:
    """LEDGER.md and the model card (one builder) show each strategy's quota and outcome."""
    from tasks.ledger import ledger_markdown

    m, _, cfg = mixed
    text = ledger_markdown({"05-augment": m})
    table = text.split("Synthetic rows by strategy (augment):")[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.strip().splitlines()[2:]}
    assert set(rows) == set(cfg.strategies)
    for name, v in m.info["strategies"].items():
        quota, generated, accepted, rejected, reasons = rows[name]
        assert (int(quota), int(generated), int(accepted), int(rejected)) == (
            v["quota"], v["generated"], v["accepted"], sum(v["rejected"].values()))
        for reason, n in v["rejected"].items():
            assert f"{reason} {n}" in reasons

def test_synthetic_rows_carry_provenance_and_their_form(mixed: tuple, stage_dir: Path) -> None:
    m, out, _ = mixed
    real = {r.id: r for r in read_records(stage_dir)}
    synthetic = [r for r in read_records(out) if r.meta.get("synthetic")]
    assert {r.meta["strategy"] for r in synthetic} >= {"fresh_reply", "paraphrase", "evolve",
                                                       "self_instruct", "doc_qa"}
    for r in synthetic:
        meta = r.meta
        assert meta["teacher"] == "fake-gpt" and meta["teacher_kind"] == "openai"
        assert meta["template_digest"] == template_digest(meta["strategy"])
        assert meta["seed_id"] == meta["seed_ids"][0] and set(meta["seed_ids"]) <= set(real)
        seed = real[meta["seed_id"]]
        if meta["strategy"] == "doc_qa":
            assert seed.kind == "text" and r.kind == "chat"
        elif meta["strategy"] == "self_instruct":
            domains = {real[s].meta["domain"] for s in meta["seed_ids"]}
            assert len(domains) == 1 and len(meta["seed_ids"]) == 3
            assert r.messages[0].content.startswith("Could you explain how I can")
        elif meta["strategy"] in ("paraphrase", "evolve"):
            assert r.messages[-2].content != seed.messages[-2].content
        elif meta["strategy"] == "fresh_reply":
            assert r.messages[:-1] == seed.messages[:-1]
    pairs = [r for r in read_records(out) if r.kind == "preference"]
    for p in pairs:  # chosen from the teacher, rejected from the tiny base model
        assert p.meta["strategy"] == "preference" and p.chosen != p.rejected
        assert p.messages[-1].role == "user"
    assert m.info["strategies"]["preference"]["generated"] == 2


def test_heldout_records_are_never_seeds(mixed: tuple, server: TeacherServer) -> None:
    m, out, _ = mixed
    prompts = [r["prompt"] for r in server.requests()]
    assert prompts and not [p for p in prompts if "HELDOUTMARKER" in p]
    assert not [s for s in m.info["seeds"] if s.startswith("h")]
    assert len(list(read_records(out, "heldout"))) == 4


def test_samples_of_accepted_and_rejected_rows_are_written(mixed: tuple) -> None:
    m, out, cfg = mixed
    samples = json.loads((out / "synthetic_samples.json").read_text())
    assert samples["accepted"] and samples["rejected"]
    assert all(s["reason"] and s["why"] for s in samples["rejected"])
    assert "synthetic_samples.json" in m.output_files


def test_synthetic_share_is_capped() -> None:
    assert synthetic_cap(30, 0.5) == 30 and synthetic_cap(30, 0.25) == 10
    assert synthetic_cap(30, 0.0) == 0
    assert trim_quotas({"a": 8, "b": 4}, 6) == {"a": 4, "b": 2}
    assert trim_quotas({"a": 5, "b": 5}, 7) == {"a": 4, "b": 3}
    assert trim_quotas({"a": 3}, 10) == {"a": 3}


def test_cap_schema_and_near_duplicates_in_a_run(stage_dir: Path, server: TeacherServer,
                                                 tmp_path: Path, session_home: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-anything")
    home = tmp_path / "home"
    shutil.copytree(session_home / "assets", home / "assets")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["answer"]}))
    teacher = TeacherConfig(kind="openai", model="fake-gpt", base_url=server.url,
                            api_key_env=KEY_ENV)
    # 33 real train records at 20%: at most 8 synthetic rows, whatever the quotas say
    cfg = AugmentConfig(strategies={"fresh_reply": 20, "doc_qa": 3}, max_synthetic_share=0.2,
                        teacher=teacher)
    m = run_augment(stage_dir, tmp_path / "a", cfg, home=home)
    m.check()
    assert m.generated == 8 == synthetic_cap(33, 0.2)
    assert sum(v["quota"] for v in m.info["strategies"].values()) == 8
    assert m.metrics["augment.valid"] >= 1
    # run again on that output: its synthetic rows are part of the data now, and the same
    # prompts get the same (cached) answers: near-duplicates, each naming the row it repeats
    again = run_augment(tmp_path / "a", tmp_path / "b", cfg, home=home)
    again.check()
    assert again.deduplicated >= 1
    for row in _rows(tmp_path / "b", "deduplicated.jsonl.gz"):
        assert row["kind"] == "near" and row["dup_of"] and row["strategy"]
    # a JSON schema: prose replies (and doc_qa's prose answers) fail it
    strict = cfg.model_copy(update={"json_schema": str(schema)})
    m = run_augment(stage_dir, tmp_path / "c", strict, home=home)
    assert m.filtered.get("synthetic_schema", 0) + m.deduplicated == 8 and m.kept == 33 + 4
    assert all("not JSON" in r["why"] for r in _rows(tmp_path / "c", "filtered.jsonl.gz"))
