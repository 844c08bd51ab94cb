"""Stage 3 on datatrove's MinHash pipeline: the same removals as in process, on every executor."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from datasketch import MinHashLSH
from pydantic import ValidationError

from model_fixtures import write_stage_dir
from test_dedup import _chat, _edited, _ids, _removed, _words

from data_contracts.config import ConfigError, DedupConfig, DedupRayConfig, load_config
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, Message
from tasks.dedup import records_over, resolve_executor, run_dedup
from tasks.dedup_common import candidate_floor
from tasks.dedup_local import signatures
from tasks.dedup_datatrove import ShingleSignature, minhash_config

# Carves a held-out split, so train copies of held-out records become eval_contamination.
BASE = dict(eval_fraction=0.1, eval_max=200)


def _corpus() -> list[ChatSample]:
    """~300 records: exact, near and short duplicates, plain texts and preference pairs in a
    shuffled order (a copy often precedes its original); then, in order, pairs on either side of
    the threshold whose MinHash estimate errs and a chain A~B~C whose ends differ (one datatrove
    cluster, where only B duplicates A)."""
    rng = random.Random(7)
    recs = [_chat(f"c{i:03d}", _words(1000 + i, 60)) for i in range(180)]
    for i in range(0, 60, 2):  # exact: only case, spacing and punctuation differ
        recs.append(_chat(f"c{i:03d}-exact", " " + " ".join(_words(1000 + i, 60)).upper() + "!"))
    for i in range(1, 60, 2):  # near: one word of 60 replaced (Jaccard ~0.84)
        words = _words(1000 + i, 60)
        words[30] = "CHANGED"
        recs.append(_chat(f"c{i:03d}-near", words))
    recs += [_chat("short-1", "Hello there!"), _chat("short-2", "hello,   THERE")]
    for i in range(30):  # plain text never goes to eval; in threes of one text
        recs.append(ChatSample(id=f"t{i:02d}", text=" ".join(_words(3000 + i // 3 * 3, 50))))
    for i in range(10):  # preference pairs may be held out; two of them repeat a prompt
        recs.append(ChatSample(id=f"p{i}", messages=[Message(role="user", content=" ".join(
            _words(4000 + i % 8, 40)))], chosen="Yes.", rejected="No."))
    rng.shuffle(recs)
    for seed, changes in ((16, 3), (943, 4)):  # true J just above / below 0.8, estimate not
        base, near = _edited(seed, changes)
        recs += [_chat(f"edit{seed}", base), _chat(f"edit{seed}-near", near)]
    chain = _words(77, 120)
    for name, positions in (("chain-a", ()), ("chain-b", (40, 80)), ("chain-c", (20, 40, 60, 80))):
        words = list(chain)
        for pos in positions:
            words[pos] = f"X{pos}"
        recs.append(_chat(name, words))
    return recs


def _outcome(stage_dir: Path) -> tuple[list[str], list[str], dict[str, tuple]]:
    """What a dedup run decided: train ids, held-out ids (in order) and every removal."""
    removed = {rid: (row["kind"], row["dup_of"], row["jaccard"])
               for rid, row in _removed(stage_dir).items()}
    return _ids(stage_dir), _ids(stage_dir, "heldout"), removed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """_corpus() as a finished stage dir, the input of every executor compared below."""
    return write_stage_dir(tmp_path_factory.mktemp("in"), _corpus())


@pytest.fixture(scope="module")
def in_process(corpus: Path, tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    """The reference: the corpus deduplicated in process (executor local)."""
    out = tmp_path_factory.mktemp("local") / "03-dedup"
    run_dedup(corpus, out, DedupConfig(**BASE), home=home)
    return out


@pytest.mark.parametrize("cfg", [DedupConfig(), DedupConfig(num_perm=64, threshold=0.6)])
def test_datatrove_buckets_are_the_in_process_lsh_bands(cfg: DedupConfig, tmp_path: Path):
    # Two records then share a datatrove bucket exactly when the in-process LSH pairs them;
    # with other hash functions the two paths would miss different near pairs.
    lsh = MinHashLSH(threshold=candidate_floor(cfg), num_perm=cfg.num_perm)
    step = ShingleSignature(str(tmp_path), minhash_config(cfg), cfg.num_perm)
    recs = [("train", _chat(f"r{i}", _words(i, 60))) for i in range(3)]
    recs.append(("train", ChatSample(id="short", text="Hi!")))
    for (_, rec), sig in zip(recs, signatures(recs, cfg), strict=True):
        bands = step.get_signature(step.get_shingles(rec.joined_text()))
        assert bands == [sig.sig[lo:hi].tolist() for lo, hi in lsh.hashranges]


def test_datatrove_local_removes_what_in_process_removes(
        corpus: Path, in_process: Path, tmp_path: Path, home: Path):
    out = tmp_path / "03-dedup"
    cfg = DedupConfig(**BASE, executor="datatrove", tasks=3, workers=2)
    m = run_dedup(corpus, out, cfg, home=home).check()
    expected = _outcome(in_process)
    assert _outcome(out) == expected
    _, heldout, removed = expected
    kinds = {kind for kind, _, _ in removed.values()}
    assert kinds == {"exact", "near", "eval_contamination"}  # the corpus exercises each
    assert removed["chain-b"][:2] == ("near", "chain-a") and "chain-c" not in removed
    linked = {rid: dup_of for rid, (_, dup_of, _) in removed.items()}  # either may be held out
    assert (linked.get("edit16-near"), linked.get("edit16")) in (
        ("edit16", None), (None, "edit16-near"))
    assert not {"edit943", "edit943-near"} & set(linked)
    assert 20 <= len(heldout) <= 30 and not any(rid.startswith("t") for rid in heldout)
    local = Manifest.read(in_process)
    assert (m.records_in, m.kept, m.deduplicated, m.splits) == (
        local.records_in, local.kept, local.deduplicated, local.splits)
    assert {k: m.metrics[k] for k in local.metrics} == local.metrics
    assert m.info["executor"] == "datatrove" and m.info["heldout"] == "carved"
    assert not (out / "_datatrove").exists()  # scratch removed after a finished run


REPO = Path(__file__).resolve().parents[1]
# The stage in a process of its own that imports ray first (ray then reads its loopback switch
# before the stage can set it). Ray also leaves gRPC threads behind in the process that ran a
# cluster, and a later fork() there (distilabel's worker pool in the pipeline tests) can die.
RAY_STAGE = ("import sys, ray; from flows.cli import main; rc = main(sys.argv[1:]); "
             "print('ray initialized after the stage:', ray.is_initialized()); sys.exit(rc)")


def _ray_processes(since: float) -> list[psutil.Process]:
    """GCS, raylet and Ray workers started after `since` that are still alive."""
    found = []
    for p in psutil.process_iter(["name", "create_time"]):
        name = p.info["name"] or ""
        if p.info["create_time"] >= since and (
                name in ("gcs_server", "raylet") or name.startswith("ray::")):
            found.append(p)
    return found


def test_ray_on_a_local_cluster_removes_the_same(
        corpus: Path, in_process: Path, tmp_path: Path, home: Path):
    out = tmp_path / "03-dedup"
    started = time.time()
    # tasks_per_job=16: one Ray actor per stage, as each new actor process imports the stage's
    # module afresh (~4 s on 2 cores); the cluster itself takes ~11-13 s to start.
    proc = subprocess.run(
        [sys.executable, "-c", RAY_STAGE, "stage", "dedup", "--input", str(corpus),
         "--output", str(out), f"run.home={home}", "dedup.eval_fraction=0.1",
         "dedup.eval_max=200", "dedup.executor=ray", "dedup.tasks=3", "dedup.ray.num_cpus=2",
         "dedup.ray.tasks_per_job=16", "dedup.ray.mem_per_cpu_gb=0.25"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m = Manifest.read(out).check()
    assert _outcome(out) == _outcome(in_process)
    assert m.info["executor"] == "ray"
    assert (m.info["ray_cluster"], m.info["ray_node_ip"]) == ("local", "127.0.0.1")
    # The stage's cluster is stopped and its processes are gone.
    assert "ray initialized after the stage: False" in proc.stdout
    _, alive = psutil.wait_procs(_ray_processes(started), timeout=5)
    assert not alive


def test_reused_heldout_split_matches_in_process(tmp_path: Path, home: Path):
    leaked, other = _words(600, 60), _words(601, 60)
    paraphrase = list(leaked)
    paraphrase[30] = "CHANGED"
    train = [_chat(f"r{i:02d}", _words(610 + i, 60)) for i in range(12)]
    train[3:3] = [_chat("t-copy", leaked), _chat("t-para", paraphrase)]
    heldout = [_chat("eval-a", leaked), _chat("eval-b", other), _chat("eval-b-again", other)]
    src = write_stage_dir(tmp_path / "in", train, heldout)
    in_proc = run_dedup(src, tmp_path / "local", DedupConfig(**BASE), home=home)
    m = run_dedup(src, tmp_path / "dt", DedupConfig(**BASE, executor="datatrove", tasks=2,
                                                    workers=1), home=home).check()
    assert _outcome(tmp_path / "dt") == _outcome(tmp_path / "local")
    _, heldout_ids, removed = _outcome(tmp_path / "dt")
    assert heldout_ids == ["eval-a", "eval-b"] and m.info["heldout"] == "reused"
    assert removed["t-copy"] == ("eval_contamination", "eval-a", 1.0)
    assert removed["t-para"][:2] == ("eval_contamination", "eval-a")
    assert removed["eval-b-again"] == ("exact", "eval-b", 1.0)
    assert {k: m.metrics[k] for k in in_proc.metrics} == in_proc.metrics


def test_slurm_without_partition_is_a_config_error(tmp_path: Path):
    with pytest.raises(ValidationError, match="dedup.slurm.partition"):
        DedupConfig(executor="slurm")
    with pytest.raises(ConfigError, match=r"dedup\.slurm: .*set dedup\.slurm\.partition"):
        load_config(overrides=[f"ingest.inputs=[{tmp_path}/chats.jsonl]",
                               "dedup.executor=slurm"])
    cfg = load_config(overrides=[f"ingest.inputs=[{tmp_path}/chats.jsonl]",
                                 "dedup.executor=slurm", "dedup.slurm.partition=cpu"])
    assert cfg.dedup.slurm.partition == "cpu"


def test_rerun_is_skipped_and_tasks_workers_leave_the_digest(tmp_path: Path, home: Path):
    train = [_chat(f"r{i:02d}", _words(500 + i, 40)) for i in range(20)]
    train.append(_chat("r00-copy", _words(500, 40)))
    src = write_stage_dir(tmp_path / "in", train)
    out = tmp_path / "out"
    cfg = DedupConfig(**BASE, executor="datatrove", tasks=2, workers=1)
    first = run_dedup(src, out, cfg, home=home)
    assert first.deduplicated == 1
    # A skipped stage returns the manifest as it is on disk; a rerun rewrites it. (started_at
    # has one-second resolution: two quick runs can share it.)
    written = (out / "manifest.json").stat().st_mtime_ns
    for moved in (cfg, cfg.model_copy(update={"tasks": 5, "workers": 3}),
                  DedupConfig(**BASE, executor="ray", tasks=7, ray=DedupRayConfig(num_cpus=1))):
        assert moved.digest() == cfg.digest()
        again = run_dedup(src, out, moved, home=home)
        assert (again.started_at, again.config_digest) == (first.started_at, first.config_digest)
        assert (out / "manifest.json").stat().st_mtime_ns == written
    assert DedupConfig(**BASE).digest() != cfg.digest()  # in process vs datatrove counts
    stricter = cfg.model_copy(update={"threshold": 0.9})
    assert stricter.digest() != cfg.digest()
    rerun = run_dedup(src, out, stricter, home=home)
    assert rerun.config_digest != first.config_digest
    assert (out / "manifest.json").stat().st_mtime_ns != written


def test_auto_executor_streams_on_disk_above_the_record_limit(tmp_path: Path, home: Path):
    """executor: auto (the default) keeps small corpora in process and sends large ones to
    datatrove's disk-based pipeline; either way the same records are removed."""
    train = [_chat(f"r{i:02d}", _words(700 + i, 40)) for i in range(20)]
    train.append(_chat("r00-copy", _words(700, 40)))
    src = write_stage_dir(tmp_path / "in", train)
    small = run_dedup(src, tmp_path / "small", DedupConfig(**BASE), home=home).check()
    assert small.info["executor"] == "local"
    assert small.info["executor_choice"] == "auto: 21 records <= local_max_records 500,000"
    large = run_dedup(src, tmp_path / "large",
                      DedupConfig(**BASE, local_max_records=20, tasks=2, workers=1),
                      home=home).check()
    assert large.info["executor"] == "datatrove"
    assert large.info["executor_choice"] == "auto: at least 21 records > local_max_records 20"
    assert _outcome(tmp_path / "large") == _outcome(tmp_path / "small")
    assert large.deduplicated == small.deduplicated == 1
    # The limit is where to run, not what to remove: it stays out of the digest.
    assert DedupConfig(local_max_records=20).digest() == DedupConfig().digest()


def test_auto_reads_raw_input_only_until_the_limit_is_passed(tmp_path: Path):
    raw = tmp_path / "chats.jsonl"
    raw.write_text("".join(json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": f"reply {i}"}]})
        + "\n" for i in range(50)))
    assert records_over(raw, 10) == (True, 11)
    assert records_over(raw, 50) == (False, 50)
    cfg, why = resolve_executor(raw, DedupConfig(local_max_records=10))
    assert cfg.executor == "datatrove" and why.startswith("auto: at least 11 records")
    assert resolve_executor(raw, DedupConfig(executor="local"))[0].executor == "local"
