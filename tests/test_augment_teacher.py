"""Generation that survives a flaky teacher: a real OpenAI-compatible HTTP server on 127.0.0.1
(tests/teacher_server.py, in a subprocess) answering 429/500, hanging, dying mid-run, refusing
a wrong key; every count is taken on the server."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from model_fixtures import support_chats, write_stage_dir
from teacher_server import TeacherServer

from data_contracts.config import AugmentConfig, TeacherConfig
from data_contracts.records import ChatSample, Message
from tasks.augment import TeacherError, run_augment
from tasks.io import read_records

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-DO-NOT-STORE-7f3a9c"
KEY_ENV = "FTFLOW_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 distinct support chats for training, 3 held out."""
    chats = [ChatSample(id=f"s{i}", messages=[
        Message(role="user", content=f"{c.messages[0].content} (ticket {i} of the queue)"),
        c.messages[1]]) for i, c in enumerate(support_chats(24, seed=3))]
    return write_stage_dir(tmp_path_factory.mktemp("aug-in") / "in", chats,
                           support_chats(3, seed=4, prefix="h"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TeacherServer]:
    srv = TeacherServer(tmp_path / "server", key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def home(tmp_path: Path, session_home: Path) -> Path:
    """A fresh ftflow home (an empty teacher cache) with the session's language-id model."""
    import shutil

    fresh = tmp_path / "home"
    shutil.copytree(session_home / "assets", fresh / "assets")
    return fresh


def teacher(url: str, **kw: Any) -> TeacherConfig:
    opts = {"timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.05, "max_backoff_s": 2.0,
            "concurrency": 4, **kw}
    return TeacherConfig(kind="openai", model="fake-gpt", base_url=url, api_key_env=KEY_ENV,
                         **opts)


def augment_cfg(url: str, n: int = 8, **kw: Any) -> AugmentConfig:
    return AugmentConfig(strategies={"fresh_reply": n}, teacher=teacher(url, **kw))


def _all_bytes(folder: Path) -> bytes:
    out = []
    for path in folder.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            out.append(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    return b"".join(out)


def test_rate_limits_and_server_errors_are_retried_and_counted(
        stage_dir: Path, tmp_path: Path, server: TeacherServer, home: Path) -> None:
    server.start(flaky=3, retry_after=1)  # first try of ~1/3 of prompts: 429, of ~1/3: 500
    m = run_augment(stage_dir, tmp_path / "out", augment_cfg(server.url, 12), home=home)
    m.check()
    reqs = server.requests()
    by_status = Counter(r["status"] for r in reqs)
    assert by_status[429] >= 1 and by_status[500] >= 1, by_status
    assert by_status[200] == 12 == m.generated  # every row completed
    # the stage's metrics count exactly the retries the server saw
    assert m.metrics["augment.teacher.retries"] == by_status[429] + by_status[500]
    assert m.metrics["augment.teacher.failed.http_429"] == by_status[429]
    assert m.metrics["augment.teacher.failed.http_500"] == by_status[500]
    assert m.metrics["augment.teacher.requests"] == len(reqs)
    # Retry-After (1 s) honoured: the retry of a 429'd prompt came at least 1 s later
    first = {r["digest"]: r["t"] for r in reqs if r["status"] == 429}
    for r in reqs:
        if r["digest"] in first and r["status"] == 200:
            assert r["t"] - first[r["digest"]] >= 1.0
    assert all(r["attempt"] <= 1 for r in reqs)
    assert KEY.encode() not in _all_bytes(tmp_path / "out") + _all_bytes(home)


def test_a_teacher_killed_mid_run_resumes_without_asking_again(
        stage_dir: Path, tmp_path: Path, server: TeacherServer, home: Path) -> None:
    server.start(die_after=5)  # SIGKILLed right after its 5th answer
    out = tmp_path / "out"
    cfg = augment_cfg(server.url, 10, concurrency=1, max_retries=2)
    with pytest.raises(TeacherError, match=f"teacher {server.url} did not answer after 3 "
                                           "attempts") as err:
        run_augment(stage_dir, out, cfg, home=home)
    assert "\n" not in str(err.value) and KEY not in str(err.value)
    assert not (out / "manifest.json").exists()  # never looks finished
    before = server.requests()
    answered = {r["digest"] for r in before if r["status"] == 200}
    assert len(answered) == 5
    server.start()  # restarted on the same port
    m = run_augment(stage_dir, out, cfg, home=home)
    m.check()
    assert m.generated == 10 and m.metrics["augment.teacher.cache_hits"] == 5
    after = server.requests()[len(before):]
    assert len(after) == 5 and not answered & {r["digest"] for r in after}
    assert Counter(r["digest"] for r in server.requests() if r["status"] == 200).most_common(1)[0][1] == 1
    # finished stages are not redone
    assert run_augment(stage_dir, out, cfg, home=home).started_at == m.started_at
    assert len(server.requests()) == len(before) + 5


def test_a_hung_request_times_out_and_is_retried(
        stage_dir: Path, tmp_path: Path, server: TeacherServer, home: Path) -> None:
    server.start(hang_marker="ticket", hang_s=60)  # every prompt hangs on its first try
    cfg = augment_cfg(server.url, 3, timeout_s=1.0, concurrency=3)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["m"] = run_augment(stage_dir, tmp_path / "out", cfg, home=home)
        except BaseException as err:  # noqa: BLE001 (reported below)
            result["err"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(50)  # a guard against a hang, not a timing: a hang would otherwise be 60 s+
    assert not worker.is_alive(), "augment hung on a request the server never answered"
    assert "err" not in result, result.get("err")
    m = result["m"]
    reqs = server.requests()
    assert sum(1 for r in reqs if r.get("hung")) == 3
    assert sum(1 for r in reqs if r["status"] == 200) == 3 == m.generated
    assert m.metrics["augment.teacher.failed.timeout"] == 3


def test_a_wrong_key_is_one_clear_line_naming_the_endpoint(
        stage_dir: Path, tmp_path: Path, server: TeacherServer, home: Path) -> None:
    server.start()
    wrong = "sk-wrong-key-0000-LEAKCHECK"
    cfg = {"augment": augment_cfg(server.url, 4).model_dump(mode="json")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "augment", "--input", str(stage_dir),
         "--output", str(tmp_path / "out"), "--config", str(tmp_path / "cfg.yaml"),
         f"run.home={home}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, KEY_ENV: wrong, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftflow: error")]
    assert errors == [f"ftflow: error: teacher {server.url} refused the API key (HTTP 401): "
                      f"check the key in ${KEY_ENV}"]
    assert "Traceback" not in proc.stderr and wrong not in proc.stderr + proc.stdout
    assert [r["status"] for r in server.requests()] == [401] * len(server.requests())
    assert len(server.requests()) <= 4  # refused at once, not retried


def test_a_teacher_that_is_down_fails_after_its_retries(stage_dir: Path, tmp_path: Path,
                                                        server: TeacherServer, home: Path) -> None:
    server.start()
    url = server.url
    server.stop()  # nothing listens there any more
    with pytest.raises(TeacherError) as err:
        run_augment(stage_dir, tmp_path / "out", augment_cfg(url, 2, max_retries=2),
                    home=home)
    assert str(err.value) == f"teacher {url} did not answer after 3 attempts (last: connection)"


def test_cache_is_keyed_by_teacher_model_prompt_and_params(stage_dir: Path, tmp_path: Path,
                                                           server: TeacherServer, home: Path) -> None:
    server.start()
    first = run_augment(stage_dir, tmp_path / "a", augment_cfg(server.url, 4), home=home)
    assert len(server.requests()) == 4
    # another output dir, same requests: all from the cache
    run_augment(stage_dir, tmp_path / "b", augment_cfg(server.url, 4), home=home)
    assert len(server.requests()) == 4
    # a different temperature is a different request
    m = run_augment(stage_dir, tmp_path / "c", augment_cfg(server.url, 4, temperature=0.2),
                    home=home)
    assert len(server.requests()) == 8 and m.metrics.get("augment.teacher.cache_hits", 0) == 0
    files = list((home / "cache" / "teacher").rglob("*.json"))
    assert len(files) == 8 and not list((home / "cache").rglob("*.partial"))
    assert all(json.loads(f.read_text())["text"] for f in files)
    # concurrency is not part of the stage's identity: the finished stage is reused
    again = run_augment(stage_dir, tmp_path / "a", augment_cfg(server.url, 4, concurrency=1),
                        home=home)
    assert again.started_at == first.started_at and len(server.requests()) == 8
    assert list(read_records(tmp_path / "a", "heldout")) == list(read_records(stage_dir,
                                                                              "heldout"))


def test_retry_after_reads_seconds_and_http_dates() -> None:
    from email.utils import formatdate

    from tasks.augment_client import retry_after_s

    assert retry_after_s("3") == 3.0 and retry_after_s("0.5") == 0.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    later = retry_after_s(formatdate(time.time() + 30, usegmt=True))
    assert later is not None and 25 <= later <= 31


def test_concurrency_limits_the_requests_in_flight(stage_dir: Path, tmp_path: Path,
                                                   server: TeacherServer, home: Path) -> None:
    server.start(latency=0.3)
    m = run_augment(stage_dir, tmp_path / "out", augment_cfg(server.url, 9, concurrency=3),
                    home=home)
    inflight = [r["inflight"] for r in server.requests()]
    assert m.generated == 9 and len(inflight) == 9
    assert max(inflight) == 3  # never more than the limit, and the limit was used
