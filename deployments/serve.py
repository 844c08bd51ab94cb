"""Serve the pipeline from this process: a cron schedule and a data-arrival trigger.

``ftflow deploy configs/demo.yaml --cron "0 3 * * *" --watch inbox/`` registers three
deployments with the Prefect API (local or ``PREFECT_API_URL``) and serves them:

- ``finetune-pipeline/nightly``: the pipeline on a cron schedule;
- ``finetune-pipeline/on-new-data``: the pipeline, triggered by an ``ftflow.data.arrived``
  event, debounced so a burst of files starts one run;
- ``watch-inbox/poll``: every minute, looks for new or changed files in the inbox and emits
  that event (files are remembered by content digest, so nothing runs twice for the same data).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from prefect import flow, serve as prefect_serve
from prefect.events import DeploymentEventTrigger, emit_event

from flows.pipeline import finetune_pipeline

DATA_EVENT = "ftflow.data.arrived"
PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.parquet", "*.csv", "*.json")


def new_files(inbox: Path, state_file: Path) -> list[str]:
    """Files in inbox whose content digest was not seen before; remembers them."""
    from tasks.io import file_digest

    seen = json.loads(state_file.read_text()) if state_file.exists() else {}
    fresh = []
    for pattern in PATTERNS:
        for path in sorted(inbox.glob(pattern)):
            digest = file_digest(str(path))
            if seen.get(str(path)) != digest:
                seen[str(path)] = digest
                fresh.append(str(path))
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(seen, indent=1, sort_keys=True))
    return fresh


@flow(name="watch-inbox", log_prints=True)
def watch_inbox(inbox: str, state_file: str) -> list[str]:
    """Emit one data-arrival event when new files land in the inbox."""
    fresh = new_files(Path(inbox), Path(state_file))
    if fresh:
        emit_event(event=DATA_EVENT, resource={"prefect.resource.id": f"ftflow.inbox.{inbox}"},
                   payload={"files": fresh})
        print(f"{len(fresh)} new file(s) in {inbox}: {fresh}")
    return fresh


def serve(config: str | None, cron: str = "0 3 * * *", watch: str | None = None,
          debounce_s: int = 300) -> None:
    """Register the deployments and serve them until interrupted."""
    params = {"config_path": str(Path(config).absolute()) if config else None}
    deployments = [finetune_pipeline.to_deployment(name="nightly", cron=cron, parameters=params)]
    if watch:
        inbox = Path(watch).absolute()
        deployments.append(finetune_pipeline.to_deployment(
            name="on-new-data", parameters=params,
            triggers=[DeploymentEventTrigger(
                expect={DATA_EVENT}, match={"prefect.resource.id": f"ftflow.inbox.{inbox}"},
                within=timedelta(seconds=debounce_s), threshold=1)],
        ))
        deployments.append(watch_inbox.to_deployment(
            name="poll", interval=60,
            parameters={"inbox": str(inbox), "state_file": str(inbox / ".ftflow-seen.json")}))
    prefect_serve(*deployments)
