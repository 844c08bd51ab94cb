"""The one MLflow helper: a parent run per pipeline run, a nested run per stage.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent
active-run stack, so Prefect's task threads cannot log into the wrong run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from data_contracts.config import FinalError
from data_contracts.manifest import Manifest
from tasks.stage_dir import PRIVATE_FILES

log = logging.getLogger(__name__)

MAX_ARTIFACT_BYTES = 20 * 1024 * 1024
MAX_PARAM_CHARS = 500
# Record files are never artifacts: the splits are big, and the private files (filtered rows,
# quarantined raw lines) hold rows that never passed the PII stage.
SKIP_ARTIFACTS = ("train-", "heldout-", *PRIVATE_FILES)
# The record files of each split in a stage directory.
SPLIT_FILES = {"train": "train-", "heldout": "heldout-"}


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A nested config section as flat ``a.b.c`` -> string params."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        text = json.dumps(obj) if isinstance(obj, list) else str(obj)
        out[prefix.rstrip(".")] = text[:MAX_PARAM_CHARS]
    return out


# How long a tracking call keeps retrying through an outage before the run fails, and the
# longest pause between tries. MLflow's own HTTP retries are bounded too (flows/env.py), so each
# try gives up in seconds and this loop reconnects as soon as the server answers again.
OUTAGE_S = float(os.environ.get("FTFLOW_TRACKING_OUTAGE_S", "300"))
MAX_BACKOFF_S = 30.0
# MLflow error codes that say "the server did not handle it", not "the request is wrong".
TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


class TrackingUnavailable(RuntimeError, FinalError):
    """The tracking server stayed unreachable for the whole retry window."""


def _transient(err: BaseException) -> bool:
    """A connection or server-side failure worth retrying (not a rejected request)."""
    import requests

    if isinstance(err, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, MlflowException):
        return err.error_code in TRANSIENT_CODES
    return isinstance(err, OSError)


def retrying(call: Callable[..., Any], uri: str, what: str,
             outage_s: float | None = None) -> Callable[..., Any]:
    """``call`` retried with bounded exponential backoff while the tracking store is
    unreachable; TrackingUnavailable naming the URI once ``outage_s`` has passed."""
    window = OUTAGE_S if outage_s is None else outage_s

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        deadline, delay, tries = time.monotonic() + window, 1.0, 0
        while True:
            try:
                result = call(*args, **kwargs)
                if tries:
                    log.warning("MLflow at %s answers again: %s went through after %d retries",
                                uri, what, tries)
                return result
            except Exception as err:  # noqa: BLE001 (sorted by _transient)
                if not _transient(err):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TrackingUnavailable(
                        f"MLflow tracking at {uri} unreachable for {window:.0f} s ({what}: "
                        f"{str(err).splitlines()[0][:200]}); stage data on disk is complete, "
                        "rerun with the same --run-id to log it") from None
                if tries == 0:
                    log.warning("MLflow at %s does not answer (%s); retrying for up to %.0f s",
                                uri, what, window)
                tries += 1
                time.sleep(min(delay, left))
                delay = min(delay * 2, MAX_BACKOFF_S)

    return wrapper


class RetryingClient:
    """An MlflowClient whose every call rides out a tracking outage (see retrying)."""

    def __init__(self, client: MlflowClient, outage_s: float | None = None) -> None:
        self._client, self._outage_s = client, outage_s
        self.tracking_uri = client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return retrying(attr, self.tracking_uri, name, self._outage_s)

    def once(self) -> MlflowClient:
        """The plain client: one try, for best-effort calls on the way out."""
        return self._client


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None = None) -> str:
    """The experiment's id, creating it; a local store keeps artifacts under artifact_root."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = not client.tracking_uri.startswith(("http://", "https://", "databricks"))
    location = (artifact_root / name).absolute().as_uri() if (local and artifact_root) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another run created it


class Tracker:
    """Logs one pipeline run into an MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None,
                 outage_s: float | None = None) -> None:
        self.uri = tracking_uri
        self.client: Any = RetryingClient(MlflowClient(tracking_uri), outage_s)
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_root)

    def start_parent(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        """The parent run of a pipeline run; tagged with this process, so that a later attempt
        can tell a killed attempt (its process gone) from a running one."""
        tags = {**tags, "ftflow.host": socket.gethostname(), "ftflow.pid": str(os.getpid())}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def mark_killed_attempts(self, run_id: str) -> list[str]:
        """Earlier attempts of this ftflow run id whose process died without ending their MLflow
        runs (SIGKILL, a lost machine): set them and their stage runs KILLED. Returns their ids."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`ftflow.run_id` = '{run_id}' and "
            "attributes.status = 'RUNNING'")
        killed: list[str] = []
        for parent in found:
            tags = parent.data.tags
            pid = tags.get("ftflow.pid")
            if tags.get("ftflow.host") == socket.gethostname() and pid and _alive(int(pid)):
                continue  # a live attempt (or a process that reused the pid): leave it
            children = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                f"'{parent.info.run_id}' and attributes.status = 'RUNNING'")
            for run in [*children, parent]:
                self.client.set_terminated(run.info.run_id, status="KILLED")
                killed.append(run.info.run_id)
        if killed:
            log.info("marked %d MLflow runs of killed attempts of run %s KILLED", len(killed),
                     run_id)
        return killed

    def start_stage(self, parent_id: str, stage: str, params: dict[str, str]) -> str:
        tags = {MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: stage, "ftflow.stage": stage}
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        items = [Metric(k, float(v), 0, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_history(self, run_id: str, history_file: Path) -> int:
        """Per-step training curves from a trainer's log history (one JSON object per line)."""
        items: list[Metric] = []
        for line in history_file.read_text().splitlines():
            row = json.loads(line)
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key in ("step", "epoch") or not isinstance(value, (int, float)):
                    continue
                items.append(Metric(f"step/{key}", float(value), 0, step))
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])
        return len(items)

    def log_stage_result(self, run_id: str, manifest: Manifest, stage_dir: Path) -> None:
        """Ledger counts and timings as metrics, manifest and small reports as artifacts."""
        self.log_metrics(run_id, manifest.ledger_metrics())
        tags = [RunTag(f"ftflow.info.{k}", str(v)[:MAX_PARAM_CHARS]) for k, v in manifest.info.items()
                if isinstance(v, (str, int, float, bool))]
        # Tags a stage names for its run as they are (the gate's gate.decision, gate.reason).
        tags += [RunTag(k, str(v)[:5000]) for k, v in manifest.info.get("mlflow_tags", {}).items()]
        if tags:
            self.client.log_batch(run_id, tags=tags)
        history = manifest.info.get("history_file")
        if history and Path(history).exists():
            self.log_history(run_id, Path(history))
        for path in sorted(stage_dir.iterdir()):
            if (path.is_file() and not path.name.startswith(SKIP_ARTIFACTS)
                    and path.stat().st_size <= MAX_ARTIFACT_BYTES):
                self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_quietly(self, run_id: str, status: str) -> None:
        """End a run on the way out of a failure: one try, never masking the failure itself."""
        try:
            self.client.once().set_terminated(run_id, status=status)
        except Exception as err:  # noqa: BLE001 (the original error is what matters)
            log.warning("could not mark MLflow run %s %s at %s: %s", run_id, status, self.uri,
                        str(err).splitlines()[0][:200] if str(err) else type(err).__name__)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_datasets(self, run_id: str, stage_dir: Path, contexts: dict[str, str]) -> int:
        """A stage directory's splits as the run's dataset inputs (mlflow.data), each with the
        digest of its files and its context (``training``, ``heldout``), never the rows."""
        import hashlib
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        manifest = Manifest.read(stage_dir)
        inputs = []
        for split, context in contexts.items():
            files = {k: v for k, v in manifest.output_files.items()
                     if k.startswith(SPLIT_FILES[split])}
            if not files:
                continue
            digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local dir
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(str(stage_dir))
            ds = MetaDataset(source, name=f"{stage_dir.name}/{split}", digest=digest)
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[
                InputTag(MLFLOW_DATASET_CONTEXT, context),
                InputTag("ftflow.records", str(manifest.splits.get(split, 0)))]))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)
        return len(inputs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run when tracking is a server; "" for a local store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
