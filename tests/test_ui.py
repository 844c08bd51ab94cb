"""What a user looks for in the two UIs, found by a browser (Playwright, Debian's chromium).

One stack as a user runs it (``ftflow up``, ``run``, ``deploy --cron --watch``, a file in the
inbox), then the Prefect UI: the nightly deployment with its cron schedule and upcoming runs,
the data-triggered run Completed with its artifacts; and the MLflow UI: the parent run's
dataset inputs, the train run's ``step/loss`` chart, the registered model with its alias.
Screenshots of each page land in the test's tmp folder (their paths are printed).

Run just this: ``pytest tests/test_ui.py``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_operations import (REPO, api, deployment, free_port, ftflow, recorded, run_logs,
                             user_env, wait_for_run)

pytestmark = [pytest.mark.operations, pytest.mark.slow]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN = ["augment.enabled=false", "train.max_steps=10", "train.eval_steps=5",
       "train.save_steps=10", "train.logging_steps=2", "evaluate.max_samples=8",
       "export.model_name=ftflow-ui", "run.experiment=ftflow-ui"]
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory: pytest.TempPathFactory, session_home: Path):
    root = tmp_path_factory.mktemp("ui")
    home, cwd = root / "home", root / "project"
    (home / "assets").mkdir(parents=True)
    cwd.mkdir()
    lid = session_home / "assets" / "lid.176.ftz"
    if lid.exists():
        shutil.copy(lid, home / "assets" / "lid.176.ftz")
    env = user_env(home)
    shutil.copytree(REPO / "sample_data", cwd / "sample_data")
    shutil.copy(REPO / "configs" / "demo.yaml", cwd / "demo.yaml")
    ports = [free_port(), free_port()]
    started = time.monotonic()
    r = ftflow("up", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
               env=env, cwd=cwd, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    st = recorded(home)
    s = SimpleNamespace(home=home, cwd=cwd, env=env, api_url=st["prefect"]["api_url"],
                        prefect=st["prefect"]["api_url"].removesuffix("/api"),
                        mlflow=st["mlflow"]["url"], shots=root / "screenshots")
    s.shots.mkdir()
    try:
        print(f"ftflow up: {time.monotonic() - started:.0f}s")
        r = ftflow("run", "demo.yaml", *RUN, env=env, cwd=cwd, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        print(f"ftflow run: {time.monotonic() - started:.0f}s")
        r = ftflow("deploy", "demo.yaml", "curate.min_new_records=100000", "--cron",
                   "0 3 * * *", "--watch", "inbox", env=env, cwd=cwd)
        assert r.returncode == 0, r.stdout + r.stderr
        (cwd / "inbox").mkdir(exist_ok=True)
        shutil.copy(REPO / "sample_data" / "support_chat.jsonl", cwd / "inbox" / "chat.jsonl")
        poll = deployment(s.api_url, "watch-inbox/poll")
        api(f"{s.api_url}/deployments/{poll['id']}/create_flow_run", {})
        run = wait_for_run(s.api_url, poll["id"], timeout=240)
        assert run["state_type"] == "COMPLETED", run_logs(s.api_url, run["id"])
        time.sleep(6)  # the file has settled: the next poll announces it
        api(f"{s.api_url}/deployments/{poll['id']}/create_flow_run", {})
        on_data = deployment(s.api_url, "finetune-pipeline/on-new-data")
        s.triggered = wait_for_run(s.api_url, on_data["id"], timeout=300)
        assert s.triggered["state_type"] == "COMPLETED", run_logs(s.api_url, s.triggered["id"])
        print(f"triggered run done: {time.monotonic() - started:.0f}s")
        yield s
    finally:
        ftflow("down", env=env, cwd=cwd, timeout=120)


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
    # The loss chart (08-train's Model metrics tab) and the registry page are not checked in the
    # browser yet: their wording in MLflow 3.17's UI was not pinned down (see the session note).
