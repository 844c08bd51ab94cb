"""The champion alias on a real `mlflow server` (127.0.0.1, started here): the evaluate stage's
gate passes a real fine-tune and fails the same recipe trained on shuffled replies, and export
of the failed one leaves champion where it was; export moves it only when the gate passed and
the version beats the champion; `ftflow promote`/`rollback` move it, recorded; two promotions
at once both land, in order; models:/NAME@champion loads and chats."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model_fixtures import build_topic_train_dir, topic_chats, worded_base, write_stage_dir

from data_contracts.config import EvaluateConfig, ExportConfig
from data_contracts.manifest import Manifest
from tasks import export_registry as registry
from tasks.evaluate import MC_TASK, PPL_TASK, run_evaluate
from tasks.export import run_export
from test_export import CHAT

REPO = Path(__file__).resolve().parents[1]
NAME = "ftflow-team"
REPLY = f"{MC_TASK}.acc_mutual_info"  # the gate's target here: the reply that answers the chat
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # no GenAI job consumers (7 processes, ~2 GB): the registry needs none of them
        env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
                 MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a busy 2-core machine takes minutes to import mlflow
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, session_home: Path,
          ) -> dict[str, tuple[Path, Path, Manifest]]:
    """The real train and evaluate stages, twice, with the same base, recipe and held-out chats:
    LoRA on topic chats ("real") and on the same chats with their replies shuffled across chats
    ("shuffled"); the gate's target is reply choice by mutual information (36 held-out chats, 4
    choices), to gain 20 points and one stderr of the difference. {kind: (train dir, evaluate
    dir, evaluate manifest)}."""
    root = tmp_path_factory.mktemp("gated")
    base = worded_base(root / "worded-base", session_home)
    data = write_stage_dir(root / "heldout", topic_chats(4, seed=20),
                           topic_chats(36, seed=21, prefix="h"))
    # 20 points: the fine-tunes measured (3 seeds) gained 36-44, those on shuffled replies -8 to +8
    cfg = EvaluateConfig(max_samples=36, num_choices=4, general_prose=0, targets=[REPLY],
                         min_gain=0.2)
    out = {}
    for kind in ("real", "shuffled"):
        train = build_topic_train_dir(root / kind, base, session_home, kind == "shuffled")
        evaluated = root / f"eval-{kind}"
        out[kind] = (train, evaluated, run_evaluate(data, train, evaluated, cfg, home=session_home))
    return out


@pytest.fixture(scope="module")
def released(server: str, gated: dict[str, tuple[Path, Path, Manifest]],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, Path, Path]:
    """Version 1 (the real fine-tune, gate passed) then version 2 (the shuffled one, gate failed,
    registered because register_if_gate_fails) exported to the server; returns the client, home,
    out."""
    root = tmp_path_factory.mktemp("released")
    home = root / "home"
    cfg = ExportConfig(model_name=NAME, gguf=[], max_new_tokens=12)
    (real, real_eval, _), (shuffled, shuffled_eval, _) = gated["real"], gated["shuffled"]
    run_export(real, real_eval, root / "out1", cfg, tracking_uri=server, home=home)
    m2 = run_export(shuffled, shuffled_eval, root / "out2",
                    cfg.model_copy(update={"register_if_gate_fails": True}),
                    tracking_uri=server, home=home)
    assert m2.info["champion"] == "champion unchanged: the gate failed"
    return MlflowClient(server, registry_uri=server), home, root / "out1"


def test_the_gate_passes_the_real_fine_tune_and_fails_the_one_on_shuffled_replies(
        gated: dict[str, tuple[Path, Path, Manifest]]) -> None:
    real, shuffled = gated["real"][2], gated["shuffled"][2]
    assert real.info["gate_passed"] is True, real.info["gate"]
    assert real.info["gate"].startswith(f"gate passed: target {REPLY}")
    assert shuffled.info["gate_passed"] is False, shuffled.info["gate"]
    assert shuffled.info["gate"].startswith(f"gate failed: did not gain enough: target {REPLY}")
    # Same base, same held-out items; only the link between question and reply differs.
    assert real.metrics[f"base.{REPLY}"] == shuffled.metrics[f"base.{REPLY}"]
    assert real.metrics[f"tuned.{REPLY}"] > shuffled.metrics[f"tuned.{REPLY}"]
    # Perplexity falls for both (both learn the replies' words): it cannot tell them apart.
    ppl = f"{PPL_TASK}.word_perplexity"
    for m in (real, shuffled):
        assert m.metrics[f"tuned.{ppl}"] < m.metrics[f"base.{ppl}"]


def _alias(client: MlflowClient, alias: str) -> str | None:
    return registry.alias_version(client, NAME, alias)


def test_a_failed_gate_leaves_champion_and_only_a_better_score_moves_it(released) -> None:
    client, home, _ = released
    assert (_alias(client, "candidate"), _alias(client, "champion")) == ("2", "1")
    tags = [client.get_model_version(NAME, v).tags for v in ("1", "2")]
    assert [t["ftflow.gate_passed"] for t in tags] == ["True", "False"]
    assert tags[0][registry.METRIC_TAG] == REPLY
    score = float(tags[0][registry.SCORE_TAG])
    # a better score with a failed gate: export would not move champion
    move, why = registry.offer_champion(client, home, NAME, "2", False, REPLY, score + .1, True)
    assert move is None and _alias(client, "champion") == "1"
    move, why = registry.offer_champion(client, home, NAME, "2", True, REPLY, score - .1, True)
    assert move is None and f"does not beat champion 1's {score:.6g}" in why
    move, why = registry.offer_champion(client, home, NAME, "2", True, "other.metric", 1.0, True)
    assert move is None and "scored on" in why and "ftflow promote" in why
    assert _alias(client, "champion") == "1"
    assert [m.version for m in registry.history(client, NAME)] == ["1"]


def test_champion_loads_from_the_server_and_chats_with_the_saved_template(
        released, server: str) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = released
    before = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(server)
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    finally:
        mlflow.set_tracking_uri(before)
    reply = model.predict([CHAT])[0]
    tok = AutoTokenizer.from_pretrained(out / "merged")
    lm = AutoModelForCausalLM.from_pretrained(out / "merged")
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")  # the saved template, not a default one
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    gen = lm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert reply == tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _cli(server: str, home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "--tracking-uri", server,
                             "--home", str(home)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(server: str, home: Path, *args: str) -> tuple[int, str]:
    proc = _cli(server, home, *args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def test_promote_and_rollback_are_recorded(released, server: str) -> None:
    client, home, _ = released
    rc, out = _run(server, home, "promote", NAME, "2", "--reason", "reviewed the replies by hand")
    assert rc == 0, out
    assert "1 -> 2" in out and _alias(client, "champion") == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["ftflow.champion.who"] == getpass.getuser()
    assert tags["ftflow.champion.reason"] == "reviewed the replies by hand"
    assert tags["ftflow.champion.previous"] == "1" and tags["ftflow.champion.action"] == "promote"
    assert client.get_model_version(NAME, "1").tags["ftflow.champion.replaced_by"].startswith("2 ")

    rc, out = _run(server, home, "rollback", NAME, "--reason", "complaints about tone")
    assert rc == 0, out
    assert _alias(client, "champion") == "1"
    assert client.get_model_version(NAME, "1").tags["ftflow.champion.previous"] == "2"
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(client, home, NAME, "again")
    with pytest.raises(MlflowException):
        registry.promote(client, home, NAME, "99", "typo")
    assert _alias(client, "champion") == "1"

    moves = registry.history(client, NAME)
    assert [(m.action, m.previous, m.version) for m in moves] == [
        ("export", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1")]
    lines = registry.history_file(home, server, NAME).read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == ["1", "2", "1"]
    # `ftflow history` and an error's exit status, in one process (each start costs seconds)
    rc, out = _run(server, home, "history", NAME)
    assert rc == 0 and "complaints about tone" in out and "now: champion 1, candidate 2" in out


def test_two_promotions_at_once_both_land_in_order(released, server: str) -> None:
    client, home, _ = released
    source = client.get_model_version(NAME, "1").source  # models:/<logged model id>
    for _ in range(2):  # versions 3 and 4, cheap copies of version 1
        v = client.create_model_version(NAME, source, model_id=source.split("/")[-1]).version
        registry.wait_ready(client, NAME, str(v))
    start = len(registry.history(client, NAME))
    procs = [_cli(server, home, "promote", NAME, v, "--reason", f"race {v}") for v in ("3", "4")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    moves = registry.history(client, NAME)[start:]
    assert sorted(m.version for m in moves) == ["3", "4"]
    first, second = moves
    # each move saw the one before it: no lost update
    assert second.previous == first.version and first.previous == "1"
    assert _alias(client, "champion") == second.version
    lines = registry.history_file(home, server, NAME).read_text().splitlines()[-2:]
    assert [json.loads(line)["version"] for line in lines] == [first.version, second.version]
