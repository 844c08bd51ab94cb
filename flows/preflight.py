"""Checks before a run does any work: the tracking store answers, the inputs exist and hold data,
the base model is there, the disk has room. Each problem is one line naming the thing, found in
seconds, before Prefect starts (a missing input used to surface after ~2.5 minutes, an empty
one after six stages on 0 records).
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from data_contracts.config import PipelineConfig

TRACKING_TIMEOUT_S = 5.0
# A rough bound on what a run writes next to its inputs: each record stage keeps a compressed
# copy of the data (ten stage directories, the curated version, MLflow's artifacts), and
# training writes checkpoints, the adapter and a full-precision merged model.
DATA_COPIES = 12
MODEL_COPIES = 4
DISK_MARGIN_BYTES = 256 * 2**20
FIRST_READ_BYTES = 64 * 1024


class PreflightError(Exception):
    """One or more things a run needs are missing; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_tracking(uri: str, timeout: float = TRACKING_TIMEOUT_S) -> str | None:
    """None when the tracking store answers (a server's /health, a database's connection)."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http only)
                if resp.status == 200:
                    return None
                return f"run.tracking_uri {uri}: {url} answered HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            return f"run.tracking_uri {uri}: {url} answered HTTP {err.code}"
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            return f"run.tracking_uri {uri}: no MLflow server answers ({reason})"
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            return f"run.tracking_uri {uri}: {folder} is not writable"
        return None
    if uri.startswith(("postgresql", "mysql", "mssql")):
        import sqlalchemy

        args = {"connect_timeout": int(timeout)} if uri.startswith(("postgresql", "mysql")) else {}
        try:
            engine = sqlalchemy.create_engine(uri, connect_args=args)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as err:  # noqa: BLE001 (any driver error is "does not answer")
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"run.tracking_uri {_redact(uri)}: the database does not answer ({first})"
    return None


def _redact(uri: str) -> str:
    """A URI without its password (user:secret@host -> user:***@host)."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else uri
    return uri


def _first_bytes(path: str) -> bytes:
    """The start of a file's content, decompressed (.gz, .zst, ...) by extension."""
    import fsspec

    with fsspec.open(path, "rb", compression="infer") as fh:
        return fh.read(FIRST_READ_BYTES)


def check_inputs(patterns: list[str]) -> tuple[list[str], int]:
    """Problems with ingest.inputs, and the bytes the inputs hold on disk."""
    from tasks.io import expand_inputs

    problems: list[str] = []
    files: list[str] = []
    for pattern in patterns:
        try:
            files += expand_inputs([pattern])
        except FileNotFoundError:
            problems.append(f"ingest.inputs: input not found: {pattern}")
        except (OSError, ValueError) as err:
            problems.append(f"ingest.inputs: {pattern}: {err}")
    if problems:
        return problems, 0
    if not files:
        return [f"ingest.inputs: no file matches {', '.join(patterns)}"], 0
    size, empty = 0, []
    for file in files:
        try:
            if "://" not in file:
                size += Path(file).stat().st_size
                if Path(file).is_dir():
                    problems.append(f"ingest.inputs: {file} is a directory, not a file")
                    continue
            if not _first_bytes(file).strip():
                empty.append(file)
        except PermissionError:
            problems.append(f"ingest.inputs: {file} is not readable (permission denied)")
        except (OSError, EOFError, ValueError) as err:
            problems.append(f"ingest.inputs: {file} cannot be read ({type(err).__name__}: {err})")
    if not problems and len(empty) == len(files):
        problems.append(f"ingest.inputs: every input is empty, no record to run on: "
                        f"{', '.join(empty)}")
    return problems, size


def _model_problem(key: str, name: str, allow_pickle: bool = False) -> tuple[str | None, int]:
    """None (and its size in bytes) when the model is a builtin, a local folder with a config and
    weights (safetensors unless pickle is allowed), or a hub id already in the local Hugging Face
    cache (runs are offline)."""
    from data_contracts.config import ConfigError
    from tasks.base_model import BUILTIN_PREFIX, TINY_NAME, check_safetensors

    if name.startswith(BUILTIN_PREFIX):
        if name != BUILTIN_PREFIX + TINY_NAME:
            return f"{key}: unknown builtin model {name} (known: {BUILTIN_PREFIX}{TINY_NAME})", 0
        return None, 0
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            return f"{key}: {name} is not a model folder", 0
        if not (path / "config.json").is_file():
            return f"{key}: {name} has no config.json", 0
        weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
        if not weights:
            return f"{key}: {name} holds no weights (*.safetensors)", 0
        try:
            check_safetensors(str(path), allow_pickle, key)
        except ConfigError as err:
            return str(err), 0
        return None, sum(w.stat().st_size for w in weights)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        cached = None
    if not isinstance(cached, str):
        return (f"{key}: {name} is neither a local model folder nor in the Hugging Face cache "
                "(runs are offline: download it first, or give a folder)"), 0
    return None, 0


def check_disk(home: Path, input_bytes: int, model_bytes: int) -> str | None:
    """None when the home's file system has room for a rough estimate of what the run writes."""
    folder = home
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = input_bytes * DATA_COPIES + model_bytes * MODEL_COPIES + DISK_MARGIN_BYTES
    if free < need:
        return (f"run.home {home}: {free / 2**20:.0f} MiB free, a run on "
                f"{input_bytes / 2**20:.1f} MiB of input with a {model_bytes / 2**20:.0f} MiB "
                f"base model needs about {need / 2**20:.0f} MiB")
    return None


def preflight(cfg: PipelineConfig) -> None:
    """Raise PreflightError listing every problem found, one line each."""
    problems: list[str] = []
    if tracking := check_tracking(cfg.run.resolved_tracking_uri()):
        problems.append(tracking)
    input_problems, input_bytes = check_inputs(cfg.ingest.inputs)
    problems += input_problems
    model, model_bytes = _model_problem("train.base_model", cfg.train.base_model,
                                        cfg.train.allow_pickle)
    if model:
        problems.append(model)
    if cfg.augment.enabled and cfg.augment.teacher.kind == "transformers":
        teacher, _ = _model_problem("augment.teacher.model", cfg.augment.teacher.model)
        if teacher:
            problems.append(teacher)
    if not problems and (disk := check_disk(Path(cfg.run.home), input_bytes, model_bytes)):
        problems.append(disk)
    if problems:
        raise PreflightError(problems)
