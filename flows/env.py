"""Process environment for offline, quiet runs (see docs/environment.md)."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": "",  # presidio's email recognizer would fetch it
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else telemetry errors and a locked SQLite
    # Local mode starts a temporary server and migrates its SQLite first: 16-18 s on an idle
    # 2-core machine, past Prefect's 20 s default as soon as the machine is busy.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",  # the flow logs to MLflow itself, not the Trainer
    # MLflow retries a request 7 times with backoff factor 2 (and 120 s timeouts): an unreachable
    # tracking server took ~6 minutes to fail. Each call now gives up in ~10 s; the tracker's own
    # loop (tasks/tracking.py) rides out a longer outage and reconnects when the server is back.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    # Against a tracking server, MLflow prints two "View run/experiment at" lines each time a
    # run ends: 22 lines per pipeline run. The run's summary prints the one URL that matters.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def quiet_offline_env() -> None:
    """Set the offline defaults; values the user already exported win."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
