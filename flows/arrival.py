"""Data arrival: new files in an inbox start a run that reads exactly those files, once.

The watcher (``watch-inbox``, a Prefect flow on a short interval) records every file it sees in
the ftflow home, never in the inbox. A file is *complete* once its size and modification time
have not changed for ``settle_s`` seconds (a writer still appending, or a copy in progress,
keeps changing them; names ending in ``.partial``, ``.tmp`` or ``.part`` and hidden files are
ignored, so write-then-rename works too). When complete files wait and nothing is settling, it
emits one ``ftflow.data.arrived`` event naming them all: a burst of files becomes one run.

A file moves ``settling -> pending -> claimed -> consumed``. The run the event starts claims its
files first (a second event for the same files finds them claimed and does nothing), and marks
them consumed only when it succeeds; a failed run releases them, so the next poll emits them
again. A file that lands while a run goes on is simply pending for the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger
from prefect.events import emit_event

DATA_EVENT = "ftflow.data.arrived"
PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.json", "*.parquet", "*.csv", "*.txt")
INCOMPLETE_SUFFIXES = (".partial", ".tmp", ".part", ".crdownload")
STATE_NAME = "arrivals.json"
REEMIT_S = 600.0  # a pending file whose event started no run is announced again after this
STALE_CLAIM_S = 3 * 24 * 3600.0  # a claim this old belongs to a run that died without a word


def inbox_resource(inbox: str | Path) -> str:
    """The Prefect event resource id of an inbox: what the data-arrival trigger matches."""
    return f"ftflow.inbox.{Path(inbox).absolute()}"


class Arrivals:
    """The state of every file seen in the inboxes of one ftflow home (one JSON file, locked)."""

    def __init__(self, home: str | Path) -> None:
        self.path = Path(home) / STATE_NAME

    @contextmanager
    def _state(self) -> Iterator[dict[str, dict[str, Any]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(self.path.read_text()) if self.path.exists() else {}
            yield state
            tmp = self.path.with_name(self.path.name + ".partial")
            tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def files(self) -> dict[str, dict[str, Any]]:
        with self._state() as state:
            return dict(state)

    def scan(self, inbox: str | Path, settle_s: float = 5.0,
             now: float | None = None) -> list[str]:
        """Record what the inbox holds; the complete files to announce now (or [])."""
        now = time.time() if now is None else now
        seen = _candidates(Path(inbox))
        with self._state() as state:
            for path, (size, mtime) in seen.items():
                e = state.get(path)
                if e is None or (e["size"], e["mtime"]) != (size, mtime):
                    old = e or {}
                    state[path] = {"size": size, "mtime": mtime, "changed_at": now,
                                   "status": "settling", "consumed_digest":
                                   old.get("consumed_digest", old.get("digest"))}
                    continue
                if e["status"] == "settling" and now - e["changed_at"] >= settle_s:
                    e["digest"] = _digest(path)
                    unchanged = e["digest"] == e.get("consumed_digest")
                    e["status"] = "consumed" if unchanged else "pending"
                    e["emitted_at"] = None
            mine = {p: e for p, e in state.items() if p in seen}
            if any(e["status"] == "settling" for e in mine.values()):
                return []  # more is landing: one event once the burst has settled
            due = sorted(p for p, e in mine.items() if e["status"] == "pending"
                         and (e.get("emitted_at") is None or now - e["emitted_at"] >= REEMIT_S))
            for p in due:
                state[p]["emitted_at"] = now
            return due

    def claim(self, files: list[str], run: str, now: float | None = None) -> list[str]:
        """Take the files for this run; those already consumed or claimed by a live run are
        left out (a second event for the same files starts a run that reads nothing)."""
        now = time.time() if now is None else now
        taken = []
        with self._state() as state:
            for f in files:
                path = str(Path(f).absolute())
                e = state.setdefault(path, {"size": None, "mtime": None, "changed_at": now,
                                            "status": "pending"})
                if e.get("digest") is None and Path(path).is_file():
                    e["digest"] = _digest(path)
                busy = (e["status"] == "claimed" and e.get("run") != run
                        and now - e.get("claimed_at", 0) < STALE_CLAIM_S)
                if e["status"] == "consumed" or busy:
                    continue
                e.update(status="claimed", run=run, claimed_at=now)
                taken.append(path)
        return taken

    def consume(self, files: list[str], run: str) -> None:
        """The run that read these files succeeded: never run them again."""
        with self._state() as state:
            for path in files:
                e = state[path]
                if e.get("run") == run:
                    e.update(status="consumed", consumed_digest=e.get("digest"))

    def release(self, files: list[str], run: str) -> None:
        """The run failed: the files are pending again, and the next poll announces them."""
        with self._state() as state:
            for path in files:
                e = state.get(path)
                if e is not None and e.get("run") == run and e["status"] == "claimed":
                    e.update(status="pending", emitted_at=None, run=None)


    def release_dead(self, is_dead: Callable[[str], bool]) -> list[str]:
        """Files claimed by a run that ended without success (crashed, cancelled, stopped by
        ``ftflow down``) go back to pending: such a run never got to release them itself."""
        freed = []
        with self._state() as state:
            runs = {e.get("run") for e in state.values() if e["status"] == "claimed"}
            dead = {r for r in runs if r and is_dead(r)}
            for path, e in state.items():
                if e["status"] == "claimed" and e.get("run") in dead:
                    e.update(status="pending", emitted_at=None, run=None)
                    freed.append(path)
        return sorted(freed)


def _run_ended_badly(run: str) -> bool:
    """Whether Prefect holds this flow run in a final state other than Completed."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = UUID(run)
    except ValueError:
        return False  # a claim from `ftflow run` in local mode: only the stale rule frees it
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(run_id).state
        except ObjectNotFound:
            return True
    return state is not None and state.is_final() and not state.is_completed()


def _candidates(inbox: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for pattern in PATTERNS:
        for p in inbox.glob(pattern):
            if p.name.startswith(".") or p.name.endswith(INCOMPLETE_SUFFIXES) or not p.is_file():
                continue
            st = p.stat()
            out[str(p.absolute())] = (st.st_size, st.st_mtime_ns)
    return out


def _digest(path: str) -> str:
    from tasks.io import file_digest

    return file_digest(path)


@flow(name="watch-inbox")
def watch_inbox(inbox: str, home: str, settle_s: float = 5.0) -> list[str]:
    """Emit one ftflow.data.arrived event naming the complete new files in the inbox."""
    arrivals = Arrivals(home)
    freed = arrivals.release_dead(_run_ended_badly)
    if freed:
        get_run_logger().warning("%d file(s) were claimed by a run that did not finish; "
                                 "they are pending again: %s", len(freed), freed)
    files = arrivals.scan(inbox, settle_s)
    if files:
        emit_event(event=DATA_EVENT, resource={"prefect.resource.id": inbox_resource(inbox)},
                   payload={"files": files})
        get_run_logger().info("%d new file(s) in %s: %s", len(files), inbox, files)
    return files
