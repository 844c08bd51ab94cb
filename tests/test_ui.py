"""What a user looks for in the two UIs, found by a browser (Playwright, Debian's chromium).

One stack as a user runs it (``ftflow up``, ``run``, ``deploy --cron --watch``), then files
landing in the inbox, picked up by the scheduler's own watcher runs: a burst of 5 files in 2 s
makes one run that reads all 5, a file landing during that run makes the next run, and with no
new file no run starts. Then the Prefect UI: the nightly deployment with its cron schedule and upcoming runs,
the data-triggered run Completed with its artifacts; and the MLflow UI: the parent run's
dataset inputs, the train run's ``step/loss`` chart, the registered model with its alias.
Screenshots of each page land in the test's tmp folder (their paths are printed).

Run just this: ``pytest tests/test_ui.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_operations import REPO, api, deployment, ftflow, run_logs, up_stack

pytestmark = [pytest.mark.operations, pytest.mark.slow]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN = ["augment.enabled=false", "train.max_steps=10", "train.eval_steps=5",
       "train.save_steps=10", "train.logging_steps=2", "evaluate.max_samples=8",
       "export.model_name=ftflow-ui", "export.gguf=[]", "run.experiment=ftflow-ui"]
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory: pytest.TempPathFactory, session_home: Path):
    root = tmp_path_factory.mktemp("ui")
    s = up_stack(root, session_home)
    env, cwd, started = s.env, s.cwd, s.started
    s.shots = root / "screenshots"
    s.shots.mkdir()
    try:
        shutil.copytree(REPO / "sample_data", cwd / "sample_data")
        shutil.copy(REPO / "configs" / "demo.yaml", cwd / "demo.yaml")
        r = ftflow("run", "demo.yaml", *RUN, env=env, cwd=cwd, timeout=1200)  # a busy machine
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        print(f"ftflow run: {time.monotonic() - started:.0f}s")
        r = ftflow("deploy", "demo.yaml", "curate.min_new_records=100000", "--cron",
                   "0 3 * * *", "--watch", "inbox", env=env, cwd=cwd)
        assert r.returncode == 0, r.stdout + r.stderr
        s.arrivals = arrivals(s)
        s.triggered = s.arrivals.runs[0]
        print(f"triggered run done: {time.monotonic() - started:.0f}s")
        yield s
    finally:
        ftflow("down", env=env, cwd=cwd, timeout=120)


def on_data_runs(api_url: str, dep_id: str) -> list[dict]:
    return api(f"{api_url}/flow_runs/filter", {"deployments": {"id": {"any_": [dep_id]}},
                                               "sort": "EXPECTED_START_TIME_ASC"})


def wait_until(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def ingested(s: SimpleNamespace, run: dict) -> list[str]:
    """The input files the run's ingest stage read, from its manifest (via its MLflow tags)."""
    exps = api(f"{s.mlflow}/api/2.0/mlflow/experiments/search", {"max_results": 100})
    found = api(f"{s.mlflow}/api/2.0/mlflow/runs/search", {
        "experiment_ids": [e["experiment_id"] for e in exps["experiments"]],
        "filter": f"tags.`prefect.flow_run_id` = '{run['id']}'"})
    tags = {t["key"]: t["value"] for t in found["runs"][0]["data"]["tags"]}
    manifest = Path(tags["ftflow.run_dir"]) / "01-ingest" / "manifest.json"
    return sorted(Path(f).name for f in json.loads(manifest.read_text())["input_digests"])


def arrivals(s: SimpleNamespace) -> SimpleNamespace:
    """Files land in the inbox; the scheduler's own watcher runs (every 15 s) start the runs.

    A burst of 5 files within 2 s -> one run that ingests all 5; a file that lands while that
    run goes on -> the next run, with that file alone; then no new file -> no further run.
    """
    inbox = s.cwd / "inbox"
    inbox.mkdir(exist_ok=True)
    lines = (REPO / "sample_data" / "support_chat.jsonl").read_bytes().splitlines()  # bad bytes too
    dep = deployment(s.api_url, "finetune-pipeline/on-new-data")["id"]
    burst = [f"burst-{i}.jsonl" for i in range(5)]
    t0 = time.monotonic()
    for i, name in enumerate(burst):
        (inbox / name).write_bytes(b"\n".join(lines[i * 20:(i + 1) * 20]) + b"\n")
        time.sleep(0.4)
    assert time.monotonic() - t0 < 2.5
    first = wait_until("a run for the burst", lambda: [
        r for r in on_data_runs(s.api_url, dep) if r["state_type"] == "RUNNING"], 300)[0]
    late = inbox / "late.jsonl"
    late.write_bytes(b"\n".join(lines[100:120]) + b"\n")
    landed = time.time()
    done = lambda: [r for r in on_data_runs(s.api_url, dep)  # noqa: E731
                    if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
    runs = wait_until("a second run for the late file", lambda: (
        d if len(d) >= 2 else None) if (d := done()) else None, 420, every=3)
    for r in runs:
        assert r["state_type"] == "COMPLETED", run_logs(s.api_url, r["id"])
    first = next(r for r in runs if r["id"] == first["id"])
    assert datetime.fromisoformat(first["end_time"]).timestamp() > landed, \
        "the burst's run ended before the late file landed: the test did not test 'during'"
    second = next(r for r in runs if r["id"] != first["id"])
    # quiet: two more watcher runs (15 s apart) find nothing, so no third run
    poll = deployment(s.api_url, "watch-inbox/poll")["id"]
    after = datetime.fromisoformat(second["end_time"]).timestamp()
    wait_until("two watcher runs after the second run", lambda: len([
        r for r in on_data_runs(s.api_url, poll) if r["state_type"] == "COMPLETED"
        and datetime.fromisoformat(r["start_time"]).timestamp() > after]) >= 2, 120, every=3)
    return SimpleNamespace(runs=[first, second], all=on_data_runs(s.api_url, dep),
                           files=[ingested(s, first), ingested(s, second)], burst=burst)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(WAIT_MS)
    yield pg
    ctx.close()


def shot(page, stack, name: str) -> None:
    path = stack.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_new_files_start_one_run_each_burst_and_nothing_is_lost_or_repeated(ui_stack) -> None:
    a = ui_stack.arrivals
    assert a.files[0] == sorted(a.burst), "the burst's run did not read exactly the 5 files"
    assert a.files[1] == ["late.jsonl"], "the file that landed during the run was not next"
    assert len(a.all) == 2, [(r["name"], r["state_type"]) for r in a.all]
    for run in a.runs:
        files = api(f"{ui_stack.api_url}/flow_runs/{run['id']}")["parameters"]["files"]
        assert sorted(Path(f).name for f in files) == a.files[a.runs.index(run)]
    state = json.loads((ui_stack.home / "arrivals.json").read_text())
    assert {Path(f).name: e["status"] for f, e in state.items()} == {
        **{n: "consumed" for n in a.burst}, "late.jsonl": "consumed"}


def test_prefect_ui_shows_the_schedule_and_the_triggered_run(ui_stack, page) -> None:
    from playwright.sync_api import expect

    page.goto(f"{ui_stack.prefect}/deployments")
    expect(page.locator("body")).to_contain_text("nightly", timeout=WAIT_MS)
    expect(page.locator("body")).to_contain_text("on-new-data", timeout=WAIT_MS)
    shot(page, ui_stack, "prefect-deployments")

    nightly = deployment(ui_stack.api_url, "finetune-pipeline/nightly")
    scheduled = api(f"{ui_stack.api_url}/flow_runs/filter", {
        "deployments": {"id": {"any_": [nightly["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
    assert scheduled, "the scheduler made no upcoming runs"
    page.goto(f"{ui_stack.prefect}/deployments/deployment/{nightly['id']}")
    body = page.locator("body")
    # the UI words the cron: "0 3 * * *" reads "At 03:00 AM every day"
    expect(body).to_contain_text("At 03:00 AM every day", timeout=WAIT_MS)
    expect(body).to_contain_text("Scheduled for", timeout=WAIT_MS)  # the next run
    expect(body).to_contain_text("Next Run", timeout=WAIT_MS)
    shot(page, ui_stack, "prefect-nightly")

    run = ui_stack.triggered
    page.goto(f"{ui_stack.prefect}/runs/flow-run/{run['id']}")
    expect(body).to_contain_text(run["name"], timeout=WAIT_MS)
    expect(body).to_contain_text("Completed", timeout=WAIT_MS)
    tab = page.get_by_role("tab", name="Artifacts")
    (tab if tab.count() else page.get_by_text("Artifacts", exact=True).first).click()
    expect(body).to_contain_text("ftflow-ledger", timeout=WAIT_MS)
    expect(body).to_contain_text("ftflow-gate", timeout=WAIT_MS)
    shot(page, ui_stack, "prefect-triggered-run")


def test_mlflow_ui_shows_the_run_its_datasets_and_its_registered_model(ui_stack, page) -> None:
    from playwright.sync_api import expect

    mlflow = ui_stack.mlflow
    exp = api(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ftflow-ui")
    exp_id = exp["experiment"]["experiment_id"]
    runs = api(f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    parent = next(r for r in runs if not any(
        t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", [])))
    body = page.locator("body")

    page.goto(f"{mlflow}/#/experiments/{exp_id}/runs/{parent['info']['run_id']}")
    names = [d["dataset"]["name"] for d in parent.get("inputs", {}).get("dataset_inputs", [])]
    train_set = next(n for n in names if n.endswith("/train"))  # 07-dedup-synthetic/train
    # the overview lists the first dataset and folds the rest into "+N"
    expect(body).to_contain_text(train_set, timeout=WAIT_MS)
    expect(body).to_contain_text("training", timeout=WAIT_MS)  # the dataset's context
    # the registered version and its alias, as the run's tags show them
    expect(body).to_contain_text("models:/ftflow-ui@candidate", timeout=WAIT_MS)
    expect(body).to_contain_text("curated dataset version 1", timeout=WAIT_MS)  # description
    shot(page, ui_stack, "mlflow-parent-run")

    # the training loss chart: the Model metrics tab draws charts as they scroll into view,
    # so search for the metric as a user does
    train = next(r for r in runs if r["info"]["run_name"] == "08-train")
    page.goto(f"{mlflow}/#/experiments/{exp_id}/runs/{train['info']['run_id']}/model-metrics")
    page.get_by_placeholder("Search metric charts").fill("loss")
    expect(body).to_contain_text("08-train (step/loss)", timeout=WAIT_MS)  # the chart's legend
    expect(page.locator(".js-plotly-plot .scatterlayer .trace").first).to_be_visible(
        timeout=WAIT_MS)
    shot(page, ui_stack, "mlflow-loss-chart")

    # the registry: the model, its version and the alias on it
    page.goto(f"{mlflow}/#/models/ftflow-ui")
    expect(body).to_contain_text("Version 1", timeout=WAIT_MS)
    expect(body).to_contain_text(re.compile(r"@\s*candidate"), timeout=WAIT_MS)
    expect(body).to_contain_text("ftflow.gate", timeout=WAIT_MS)  # why it was registered
    shot(page, ui_stack, "mlflow-registry")
