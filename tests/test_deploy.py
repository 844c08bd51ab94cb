"""Deployments on a real `prefect server`: a cron schedule, an inbox poller, a data trigger."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.serve import DATA_EVENT, new_files
from flows.stack import local_servers

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_new_files_reports_each_content_once(tmp_path: Path) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state.json"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text('{"text": "one"}\n')
    (inbox / "notes.txt").write_text("not data")
    assert new_files(inbox, state) == [str(inbox / "a.jsonl")]
    assert new_files(inbox, state) == []  # nothing new: no second run for the same data
    (inbox / "a.jsonl").write_text('{"text": "one, edited"}\n')
    (inbox / "b.parquet").write_bytes(b"PAR1")
    assert sorted(new_files(inbox, state)) == [str(inbox / "a.jsonl"), str(inbox / "b.parquet")]


@pytest.mark.slow
def test_deploy_registers_schedule_trigger_and_poller(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with local_servers(tmp_path / "stack", free_port(), free_port()) as stack:
        env = dict(os.environ, PREFECT_API_URL=stack.prefect_api_url,
                   PREFECT_HOME=str(tmp_path / "prefect-client"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "deploy", str(REPO / "configs" / "demo.yaml"),
             "--cron", "15 2 * * *", "--watch", str(inbox)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            async def read() -> tuple[list, list]:
                async with get_client() as client:
                    return await client.read_deployments(), await client.read_automations()

            with temporary_settings({PREFECT_API_URL: stack.prefect_api_url}):
                deadline = time.monotonic() + 120
                deployments, automations = [], []
                while time.monotonic() < deadline and (len(deployments) < 3 or not automations):
                    time.sleep(2)
                    deployments, automations = asyncio.run(read())
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        by_name = {d.name: d for d in deployments}
        assert set(by_name) == {"nightly", "on-new-data", "poll"}
        assert [s.schedule.cron for s in by_name["nightly"].schedules] == ["15 2 * * *"]
        assert by_name["poll"].schedules[0].schedule.interval.total_seconds() == 60
        assert by_name["poll"].parameters["inbox"] == str(inbox)
        assert not by_name["on-new-data"].schedules  # started by events, not by the clock
        expects = [set(a.trigger.expect) for a in automations]
        assert {DATA_EVENT} in expects
