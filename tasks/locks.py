"""A lock file for what runs on one ftflow home share (Prefect's local database, the tiny base
model they build on first use): the second run waits for the first and says so."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` while inside; log ``waiting`` once if another process
    holds it. The kernel releases it when the holder dies, SIGKILL included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting: %s (%s)", waiting, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
