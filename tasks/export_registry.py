"""The model registry's aliases, operated by a team: ``candidate`` and ``champion``.

``candidate`` points at the newest registered version. ``champion`` is the version a team serves:
export moves it only when the gate passed and the new version beats the current champion on the
target metric; people move it with ``ftflow promote`` / ``ftflow rollback``. Every move of
``champion`` is a compare-and-set under a lock, recorded on the versions (tags: who, when, why,
the previous version) and in a history (a registered-model tag and a JSON-lines file in the home).

MLflow aliases have no compare-and-set, so the lock is a file lock in the ftflow home keyed on the
tracking URI and the model name: it serialises every ftflow process that shares the home (one
machine, or a shared home folder). Processes with different homes writing the same server registry
are not serialised; each move still re-reads the alias after setting it and fails if another
writer changed it in between, so a lost race is reported, never silent.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CANDIDATE, CHAMPION = "candidate", "champion"
HISTORY_TAG = "ftflow.champion.history"
HISTORY_TAG_MAX = 4500  # registered-model tag values are capped (5000 on some stores)
SCORE_TAG, METRIC_TAG, DIRECTION_TAG = ("ftflow.target_score", "ftflow.target_metric",
                                        "ftflow.higher_is_better")
GATE_TAG = "ftflow.gate_passed"


class RegistryError(RuntimeError):
    """A move the registry refuses: unknown version, nothing to roll back to, a lost race."""


@dataclass(frozen=True)
class Move:
    """One move of the champion alias."""

    action: str  # "export" (automatic), "promote", "rollback"
    version: str
    previous: str | None
    who: str
    when: str
    reason: str


def _key(tracking_uri: str, name: str) -> str:
    return hashlib.sha256(f"{tracking_uri}|{name}".encode()).hexdigest()[:16]


def history_file(home: str | Path, tracking_uri: str, name: str) -> Path:
    """The full champion history of a model in this store, one JSON move per line."""
    return Path(home) / "registry" / f"{name}-{_key(tracking_uri, name)}.history.jsonl"


@contextmanager
def registry_lock(home: str | Path, tracking_uri: str, name: str,
                  timeout_s: float = 120) -> Iterator[None]:
    """The lock every alias move of this model in this store takes (see the module docstring)."""
    from filelock import FileLock, Timeout

    path = Path(home) / "locks" / f"registry-{_key(tracking_uri, name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=timeout_s):
            yield
    except Timeout:
        raise RegistryError(f"another ftflow process has held the registry lock {path} for "
                            f"{timeout_s:.0f}s; try again") from None


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, None when the alias (or the model) does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def history(client: MlflowClient, name: str) -> list[Move]:
    """The recorded champion moves of a model, oldest first (the newest ones the tag holds)."""
    try:
        raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    except MlflowException:
        return []
    return [Move(**m) for m in json.loads(raw)]


def _champion_stack(moves: list[Move]) -> list[str]:
    """The champions in order, rollbacks popped: the last is current, the one before is where a
    rollback goes."""
    stack: list[str] = []
    for m in moves:
        if m.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != m.version:
                stack.append(m.version)
        else:
            stack.append(m.version)
    return stack


def _set_champion(client: MlflowClient, home: str | Path, name: str, version: str,
                  expected: str | None, action: str, reason: str) -> Move:
    """Compare-and-set the champion alias (the caller holds the lock) and record the move."""
    current = alias_version(client, name, CHAMPION)
    if current != expected:
        raise RegistryError(f"{name}: champion moved from {expected} to {current} meanwhile; "
                            "nothing changed, try again")
    mv = client.get_model_version(name, version)  # raises for an unknown version
    if mv.status != "READY":
        raise RegistryError(f"{name} version {version} is {mv.status}, not READY")
    move = Move(action=action, version=version, previous=current, who=getpass.getuser(),
                when=datetime.now(timezone.utc).isoformat(timespec="seconds"), reason=reason)
    client.set_registered_model_alias(name, CHAMPION, version)
    if (now := alias_version(client, name, CHAMPION)) != version:
        raise RegistryError(f"{name}: champion is {now} right after setting it to {version}: "
                            "another writer outside this home's lock moved it")
    prefix = "ftflow.champion."
    for key in ("action", "who", "when", "reason", "previous"):
        client.set_model_version_tag(name, version, prefix + key, str(getattr(move, key) or "-"))
    if current is not None:
        client.set_model_version_tag(name, current, prefix + "replaced_by",
                                     f"{version} ({move.action} by {move.who} at {move.when})")
    _append_history(client, home, name, move)
    return move


def _append_history(client: MlflowClient, home: str | Path, name: str, move: Move) -> None:
    moves = [asdict(m) for m in history(client, name)] + [asdict(move)]
    text = json.dumps(moves, separators=(",", ":"))
    while len(text) > HISTORY_TAG_MAX and len(moves) > 1:  # the file keeps the full history
        moves = moves[1:]
        text = json.dumps(moves, separators=(",", ":"))
    client.set_registered_model_tag(name, HISTORY_TAG, text)
    path = history_file(home, client.tracking_uri, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(move)) + "\n")


def promote(client: MlflowClient, home: str | Path, name: str, version: str,
            reason: str) -> Move:
    """Make `version` the champion (a person's decision: no score comparison)."""
    if not reason.strip():
        raise RegistryError("a promotion needs a reason (--reason)")
    with registry_lock(home, client.tracking_uri, name):
        current = alias_version(client, name, CHAMPION)
        if current == str(version):
            raise RegistryError(f"{name} version {version} is already the champion")
        return _set_champion(client, home, name, str(version), current, "promote", reason)


def rollback(client: MlflowClient, home: str | Path, name: str, reason: str) -> Move:
    """Move the champion back to the version it replaced."""
    if not reason.strip():
        raise RegistryError("a rollback needs a reason (--reason)")
    with registry_lock(home, client.tracking_uri, name):
        current = alias_version(client, name, CHAMPION)
        stack = _champion_stack(history(client, name))
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        if not stack or stack[-1] != current:
            raise RegistryError(f"{name}: champion {current} was not set by ftflow (its history "
                                f"ends at {stack[-1] if stack else 'nothing'}); promote a version "
                                "by hand instead")
        if len(stack) < 2:
            raise RegistryError(f"{name}: champion {current} is the first one; there is no "
                                "earlier champion to roll back to")
        return _set_champion(client, home, name, stack[-2], current, "rollback", reason)


def move_candidate(client: MlflowClient, home: str | Path, name: str, version: str,
                   alias: str = CANDIDATE) -> bool:
    """Point `candidate` at `version` unless a newer version already holds it (two runs that
    finish together leave it on the newest, whichever finishes last)."""
    with registry_lock(home, client.tracking_uri, name):
        current = alias_version(client, name, alias)
        if current is not None and int(current) > int(version):
            return False
        client.set_registered_model_alias(name, alias, version)
        return True


def _beats(new: float, old: float, higher_is_better: bool) -> bool:
    return new > old if higher_is_better else new < old


def offer_champion(client: MlflowClient, home: str | Path, name: str, version: str,
                   gate_passed: bool, metric: str, score: float | None,
                   higher_is_better: bool) -> tuple[Move | None, str]:
    """Export's automatic move: champion only when the gate passed and `version` beats the
    current champion on the target metric. Returns the move (or None) and the reason."""
    if not gate_passed:
        return None, "champion unchanged: the gate failed"
    if score is None or not math.isfinite(score):
        return None, f"champion unchanged: no finite target score ({metric}) to compare"
    with registry_lock(home, client.tracking_uri, name):
        current = alias_version(client, name, CHAMPION)
        if current is None:
            why = f"first version to pass the gate ({metric} {score:.6g})"
            return _set_champion(client, home, name, version, None, "export", why), why
        tags = client.get_model_version(name, current).tags
        if tags.get(METRIC_TAG) != metric or SCORE_TAG not in tags:
            return None, (f"champion unchanged: champion {current} was scored on "
                          f"{tags.get(METRIC_TAG, 'no recorded metric')}, not {metric}; "
                          f"compare them and `ftflow promote {name} {version}` if it is better")
        old = float(tags[SCORE_TAG])
        better = "higher" if higher_is_better else "lower"
        if not _beats(score, old, higher_is_better):
            return None, (f"champion unchanged: {metric} {score:.6g} does not beat champion "
                          f"{current}'s {old:.6g} ({better} is better)")
        why = f"{metric} {score:.6g} beats champion {current}'s {old:.6g} ({better} is better)"
        return _set_champion(client, home, name, version, current, "export", why), why


def wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 120) -> None:
    """Model versions on a remote registry may be PENDING_REGISTRATION for a moment."""
    deadline = time.monotonic() + timeout_s
    while client.get_model_version(name, version).status != "READY":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model version {name}/{version} not READY after {timeout_s}s")
        time.sleep(1)
