"""An MLflow outage (issue 10, item 3): tracking calls ride out a server that stops and comes
back (they reconnect), and fail with one message naming the URI when it stays down; an
unreachable URI fails in seconds, not ~6 minutes. A real `mlflow server`, stopped and started."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from ops_helpers import MlflowServer, free_port
from tasks.tracking import Tracker, TrackingUnavailable


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path)
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_tracking_reconnects_after_an_outage(server: MlflowServer) -> None:
    tracker = Tracker(server.uri, "outage", outage_s=900)  # a restart takes minutes on a loaded machine
    run = tracker.start_parent("outage-run", {"a": "1"}, {"ftflow.run_id": "x"})
    server.stop()
    back = threading.Timer(4.0, server.start)  # the server comes back while the call retries
    back.start()
    try:
        tracker.log_metrics(run, {"kept": 7.0})
        tracker.end(run)
    finally:
        back.join()
    got = MlflowClient(server.uri).get_run(run)
    assert got.data.metrics["kept"] == 7.0 and got.info.status == "FINISHED"


def test_tracking_down_for_good_names_the_uri(server: MlflowServer) -> None:
    tracker = Tracker(server.uri, "outage", outage_s=3)
    run = tracker.start_parent("outage-run", {}, {"ftflow.run_id": "y"})
    server.stop()
    with pytest.raises(TrackingUnavailable, match=f"MLflow tracking at {server.uri} unreachable"):
        tracker.log_metrics(run, {"kept": 1.0})


def test_unreachable_uri_fails_in_seconds_not_minutes() -> None:
    """MLflow's default client retries (7, backoff factor 2) took ~6 minutes to give up on a
    refused connection; the bounded settings (flows/env.py, forced by the tests' conftest) let
    one call give up after a few retries. Measured, not asserted on time: the call must end."""
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=uri):
        Tracker(uri, "nowhere", outage_s=0)
    print(f"unreachable tracking URI failed after {time.monotonic() - t0:.1f} s")


def test_rerun_marks_runs_of_dead_attempts_killed(tmp_path: Path) -> None:
    """An attempt killed outright (SIGKILL) leaves its runs RUNNING; the next attempt of the same
    run id marks them KILLED, and leaves alone an attempt whose process is alive."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "attempts")
    dead = tracker.start_parent("dead", {}, {"ftflow.run_id": "r1"})
    dead_stage = tracker.start_stage(dead, "01-ingest", {})
    tracker.client.set_tag(dead, "ftflow.pid", "999999999")  # no such process
    live = tracker.start_parent("live", {}, {"ftflow.run_id": "r1"})  # this process
    other = tracker.start_parent("other", {}, {"ftflow.run_id": "r2"})
    assert sorted(tracker.mark_killed_attempts("r1")) == sorted([dead, dead_stage])
    status = {r: tracker.client.get_run(r).info.status for r in (dead, dead_stage, live, other)}
    assert status == {dead: "KILLED", dead_stage: "KILLED", live: "RUNNING", other: "RUNNING"}
