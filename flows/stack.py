"""The local stack: ``prefect server``, a Prefect process worker and ``mlflow server``.

``ftflow up`` starts the three, each in its own session (process group), waits until each
answers, records them in ``<home>/stack.json`` (pids, start times, ports, URLs) and returns:
the stack keeps running without a terminal. ``ftflow down`` stops exactly what that file
records, also after ``up`` itself was killed half-way; ``ftflow status`` says what runs.
``ftflow stack`` is ``up`` in the foreground: Ctrl-C or SIGTERM stops all of it.

Every other ``ftflow`` command uses a running stack of its home (``stack_env``) unless the
user set ``PREFECT_API_URL`` / ``FTFLOW_TRACKING_URI`` (or ``run.tracking_uri``) themselves.
Servers bind 127.0.0.1 only: the UIs have no authentication.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # never 0.0.0.0: the UIs have no authentication
STATE_FILE = "stack.json"
DEFAULT_POOL = "ftflow"
COMPONENTS = ("prefect", "mlflow", "worker")  # start order; stopped in reverse


@dataclass
class Stack:
    prefect_api_url: str
    mlflow_uri: str


class StackError(RuntimeError):
    """The stack could not start (a server died, timed out, or a port is taken)."""


class _Stop(BaseException):
    """SIGTERM/SIGINT/SIGHUP while ``up`` works or ``stack`` waits."""


def _bin(name: str) -> str:
    """The console script beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


# ---------------------------------------------------------------- processes (Linux /proc)

@dataclass
class _Proc:
    pid: int
    ppid: int
    sid: int
    start: int  # clock ticks after boot: with the pid, names one process for good
    zombie: bool


def _read_proc(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp session ... starttime(22nd)": comm may hold spaces/parens
    rest = raw[raw.rindex(")") + 2:].split()
    return _Proc(pid, int(rest[1]), int(rest[3]), int(rest[19]), rest[0] in ("Z", "X"))


def _all_procs() -> dict[int, _Proc]:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (p := _read_proc(int(entry))) is not None:
            procs[p.pid] = p
    return procs


def _alive(entry: dict[str, Any]) -> bool:
    """The recorded leader still runs, and is the process we started (same start time)."""
    p = _read_proc(int(entry["pid"]))
    return p is not None and not p.zombie and p.start == entry["start"]


def _members(entry: dict[str, Any]) -> dict[int, int]:
    """pid -> start time of every live process a recorded component consists of.

    Its session (we started its leader with a new session: uvicorn/gunicorn children stay
    in it even when the leader died) plus their descendants (a worker's flow runs get
    sessions of their own). A pid still in use as a session id is never reused by Linux, so
    a session's members are ours even after the leader exited; if the leader's pid now names
    a process with another start time, nothing of ours is left.
    """
    leader, procs = int(entry["pid"]), _all_procs()
    if leader in procs and procs[leader].start != entry["start"]:
        return {}
    ours = {p.pid for p in procs.values() if p.sid == leader and p.start >= entry["start"]}
    grew = True
    while grew:
        kids = {p.pid for p in procs.values() if p.ppid in ours and p.pid not in ours}
        ours |= kids
        grew = bool(kids)
    return {pid: procs[pid].start for pid in ours if not procs[pid].zombie}


def _terminate(members: dict[int, int], grace: float) -> dict[int, int]:
    """SIGTERM, then SIGKILL after ``grace`` s; returns what still runs (should be empty)."""
    def still() -> dict[int, int]:
        left = {}
        for pid, start in members.items():
            p = _read_proc(pid)
            if p is not None and p.start == start and not p.zombie:
                left[pid] = start
        return left

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in still():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while still() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not still():
            return {}
    return still()


# ---------------------------------------------------------------- state file

def state_path(home: Path) -> Path:
    return Path(home) / STATE_FILE


def read_state(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(home).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_state(home: Path, state: dict[str, Any]) -> None:
    path = state_path(home)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)  # a kill mid-write leaves the previous, complete record


def stack_env(home: Path) -> dict[str, str]:
    """PREFECT_API_URL and FTFLOW_TRACKING_URI of the stack running in ``home``, else {}."""
    state = read_state(home)
    if not state or not all(c in state and _alive(state[c]) for c in ("prefect", "mlflow")):
        return {}
    return {"PREFECT_API_URL": state["prefect"]["api_url"],
            "FTFLOW_TRACKING_URI": state["mlflow"]["url"]}


def apply_stack_env(home: Path) -> dict[str, str]:
    """Point this process at the home's running stack where the user set nothing else.

    FTFLOW_NO_STACK=1 turns this off (the test suite sets it: a developer's running stack
    must not receive the tests' runs).
    """
    if os.environ.get("FTFLOW_NO_STACK") == "1":
        return {}
    env = stack_env(home)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


# ---------------------------------------------------------------- health

def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _post_json(url: str, body: dict[str, Any], timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def prefect_reachable(api_url: str, timeout: float = 3.0) -> bool:
    return _http_ok(f"{api_url.rstrip('/')}/health", timeout)


def worker_online(api_url: str, pool: str) -> bool:
    try:
        workers = _post_json(f"{api_url}/work_pools/{pool}/workers/filter", {})
    except (OSError, ValueError):
        return False
    return any(w.get("status") == "ONLINE" for w in workers or [])


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except FileNotFoundError:
        return ""


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll url until it answers 200; fail with the server's log tail if it dies or times out."""
    _wait(lambda: _http_ok(url), proc, timeout, log, url)


def _wait(ready: Any, proc: subprocess.Popen, timeout: float, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what}: exited with {proc.returncode}:\n{_log_tail(log)}")
        if ready():
            return
        time.sleep(0.5)
    raise StackError(f"{what}: not ready after {timeout:.0f}s:\n{_log_tail(log)}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


# ---------------------------------------------------------------- starting

def _base_env(home: Path, prefect_port: int) -> dict[str, str]:
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               PREFECT_UI_API_URL=f"http://{HOST}:{prefect_port}/api")
    for key in ("PREFECT_API_URL", "FTFLOW_TRACKING_URI"):  # never another stack's
        env.pop(key, None)
    # MLflow 3's server starts 7 job-queue consumers (GenAI scorers, optimizers, trace
    # roll-ups; ~290 MB each, ~2 GB in all) that ftflow never uses; a user who wants them sets
    # the variable to true.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _prefect_server_env(env: dict[str, str], home: Path, db_url: str | None) -> dict[str, str]:
    server_env = dict(env, PREFECT_HOME=str(home / "prefect-server"))
    (home / "prefect-server").mkdir(parents=True, exist_ok=True)
    if db_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
    # SQLite's busy timeout (Prefect's default 10 s): a worker, its flow runs and the UI write
    # at once, and on a loaded 2-core machine 10 s ends in "database is locked" errors.
    server_env.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
    return server_env


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _entry(proc: subprocess.Popen, log: Path, **info: Any) -> dict[str, Any]:
    p = _read_proc(proc.pid)
    return {"pid": proc.pid, "pgid": proc.pid, "start": p.start if p else 0,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "log": str(log), **info}


def _prefect_cmd(port: int) -> list[str]:
    return [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]


def _mlflow_cmd(home: Path, port: int, backend: str | None) -> list[str]:
    backend = backend or f"sqlite:///{home / 'mlflow.db'}"
    for plain in ("postgresql://", "postgres://"):  # SQLAlchemy's default driver: psycopg2,
        if backend.startswith(plain):               # not installed; psycopg v3 is
            backend = "postgresql+psycopg://" + backend[len(plain):]
    return [_bin("mlflow"), "server", "--backend-store-uri", backend,
            "--artifacts-destination", str(home / "mlartifacts"),
            "--host", HOST, "--port", str(port), "--workers", "1"]


def _redact(url: str | None) -> str | None:
    """A database URL without its password, for the state file and messages."""
    if not url or "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}@{host}"


def up(home: Path, prefect_port: int = 4200, mlflow_port: int = 5000,
       backend: str | None = None, prefect_db_url: str | None = None,
       pool: str = DEFAULT_POOL, foreground: bool = False, timeout: float = 240,
       worker_limit: int = 1) -> int:
    """Start the stack and record it; detach unless ``foreground``. Returns the exit code."""
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    state = read_state(home)
    if state:
        if status(home, quiet=True) == 0:
            print(f"ftflow stack already running in {home}:")
            _print_urls(state)
            return 0
        print(f"a previous stack in {home} is partly down: stopping what is left of it")
        down(home, quiet=True)
    taken = [p for p in (prefect_port, mlflow_port) if not _port_free(p)]
    if taken:
        print(f"ftflow: error: port {taken[0]} on {HOST} is in use "
              "(another stack? `ftflow status`, or pick --prefect-port/--mlflow-port)",
              file=sys.stderr)
        return 2

    api_url = f"http://{HOST}:{prefect_port}/api"
    mlflow_url = f"http://{HOST}:{mlflow_port}"
    logs = home / "logs"
    env = _base_env(home, prefect_port)
    state = {"home": str(home), "pool": pool, "ready": False,
             "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    previous = {s: signal.signal(s, _raise_stop)
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        server_env = _prefect_server_env(env, home, prefect_db_url)
        plog = logs / "prefect-server.log"
        pproc = _spawn(_prefect_cmd(prefect_port), server_env, plog)
        state["prefect"] = _entry(pproc, plog, port=prefect_port, api_url=api_url,
                                  url=api_url.removesuffix("/api"),
                                  database=_redact(prefect_db_url) or "sqlite")
        _write_state(home, state)  # from here on `ftflow down` can stop it, whatever happens

        mlog = logs / "mlflow-server.log"
        mproc = _spawn(_mlflow_cmd(home, mlflow_port, backend), env, mlog)
        state["mlflow"] = _entry(mproc, mlog, port=mlflow_port, url=mlflow_url,
                                 backend=_redact(backend) or "sqlite")
        _write_state(home, state)

        wait_healthy(f"{api_url}/health", pproc, timeout, plog)
        print(f"prefect server ready: {state['prefect']['url']}")

        # The worker creates its pool (type process, default job template) when missing.
        worker_env = dict(env, PREFECT_API_URL=api_url, PREFECT_HOME=str(home / "prefect"),
                          FTFLOW_HOME=str(home), FTFLOW_TRACKING_URI=mlflow_url)
        (home / "prefect").mkdir(exist_ok=True)
        wlog = logs / "prefect-worker.log"
        # --limit: flow runs at once; the pipeline uses every core, two at once only contend
        wproc = _spawn([_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                        "--limit", str(worker_limit)], worker_env, wlog)
        state["worker"] = _entry(wproc, wlog, pool=pool, limit=worker_limit)
        _write_state(home, state)

        wait_healthy(f"{mlflow_url}/health", mproc, timeout, mlog)
        print(f"mlflow server ready: {mlflow_url}")
        _wait(lambda: worker_online(api_url, pool), wproc, timeout, wlog, f"worker ({pool})")
        print(f"worker ready: pool {pool}")
        state["ready"] = True
        _write_state(home, state)
    except (_Stop, StackError, OSError) as err:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        reason = "interrupted" if isinstance(err, _Stop) else str(err)
        print(f"ftflow: error: the stack did not start ({reason}); stopping what started",
              file=sys.stderr)
        down(home, quiet=True)
        return 128 + err.args[0] if isinstance(err, _Stop) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _print_urls(state)
    if foreground:
        return _hold(home)
    print(f"the stack runs in the background; `ftflow status`, `ftflow down` (home {home})")
    return 0


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def _hold(home: Path) -> int:
    """Foreground: wait for Ctrl-C/SIGTERM (or a component's death), then stop everything."""
    previous = {s: signal.signal(s, _raise_stop)
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    code = 0
    try:
        print("Ctrl-C stops the stack.")
        while True:
            state = read_state(home) or {}
            dead = [c for c in COMPONENTS if c not in state or not _alive(state[c])]
            if dead:
                print(f"ftflow: error: {', '.join(dead)} stopped; stopping the stack",
                      file=sys.stderr)
                code = 1
                break
            time.sleep(1)
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    down(home)
    return code


def _print_urls(state: dict[str, Any]) -> None:
    if "prefect" in state:
        print(f"Prefect UI     : {state['prefect']['url']}   "
              f"(API {state['prefect']['api_url']}, work pool {state.get('pool')})")
    if "mlflow" in state:
        print(f"MLflow UI      : {state['mlflow']['url']}")
    print("`ftflow run`/`ftflow deploy` from this home use them; elsewhere:")
    if "prefect" in state:
        print(f"  export PREFECT_API_URL={state['prefect']['api_url']}")
    if "mlflow" in state:
        print(f"  export FTFLOW_TRACKING_URI={state['mlflow']['url']}")


# ---------------------------------------------------------------- stopping and status

def down(home: Path, grace: float = 20.0, quiet: bool = False) -> int:
    """Stop what ``up`` recorded in ``home`` (and only that); remove the record."""
    home = Path(home).absolute()
    state = read_state(home)
    if not state:
        if not quiet:
            print(f"no stack recorded in {home}")
        return 0
    code = 0
    for name in reversed(COMPONENTS):
        if name == "mlflow" and "worker" in state:
            _crash_orphans(state, quiet)  # the worker is gone; the Prefect server is still up
        if name not in state:
            continue
        members: dict[int, int] = {}
        left: dict[int, int] = {}
        for _ in range(3):  # again: a server starting up may have forked since the last look
            found = _members(state[name])
            if not found:
                break
            members |= found
            left = _terminate(found, grace)
            if left:
                break
        if left:
            code = 1
            print(f"ftflow: error: {name}: could not stop pids {sorted(left)}", file=sys.stderr)
        elif not quiet:
            print(f"stopped {name}" + (f" ({len(members)} processes)" if members else
                                       " (was not running)"))
    if code == 0:
        state_path(home).unlink(missing_ok=True)
    return code


IN_FLIGHT = ["PENDING", "RUNNING", "CANCELLING"]


def _crash_orphans(state: dict[str, Any], quiet: bool) -> None:
    """Runs the stopped worker was executing end Crashed, saying why, instead of Running forever.

    A data-arrival run's files go back to pending at the watcher's next look (its claim belongs
    to a crashed run), and any run resumes with ``ftflow run CONFIG --run-id ID``.
    """
    api_url = state.get("prefect", {}).get("api_url")
    if not api_url or not prefect_reachable(api_url):
        return
    try:
        runs = _post_json(f"{api_url}/flow_runs/filter", {
            "work_pools": {"name": {"any_": [state.get("pool")]}},
            "flow_runs": {"state": {"type": {"any_": IN_FLIGHT}}}})
        for run in runs or []:
            _post_json(f"{api_url}/flow_runs/{run['id']}/set_state", {"force": True, "state": {
                "type": "CRASHED", "name": "Crashed",
                "message": "ftflow down stopped the stack while this run was going; its "
                           "finished stages are kept: rerun it to resume"}})
            if not quiet:
                print(f"marked run {run['name']} Crashed (it was {run['state_type']})")
    except (OSError, ValueError) as err:
        print(f"ftflow: warning: could not mark the interrupted runs: {err}", file=sys.stderr)


def status(home: Path, quiet: bool = False) -> int:
    """Print what runs and where; 0 when every component runs and answers, else 1."""
    home = Path(home).absolute()
    state = read_state(home)
    if not state:
        if not quiet:
            print(f"no stack recorded in {home} (start one: ftflow up)")
        return 1
    checks = {
        "prefect": lambda e: _http_ok(f"{e['api_url']}/health"),
        "mlflow": lambda e: _http_ok(f"{e['url']}/health"),
        "worker": lambda e: "prefect" in state and worker_online(state["prefect"]["api_url"],
                                                                 e["pool"]),
    }
    ok = True
    lines = [f"ftflow stack in {home} (started {state.get('started_at')})"]
    for name in COMPONENTS:
        entry = state.get(name)
        if entry is None:
            ok = False
            lines.append(f"  {name:8} not started")
            continue
        alive = _alive(entry)
        healthy = alive and checks[name](entry)
        ok = ok and healthy
        word = "running" if healthy else ("not answering" if alive else "stopped")
        where = entry.get("url") or f"pool {entry.get('pool')}"
        lines.append(f"  {name:8} {word:14} pid {entry['pid']:<8} {where}")
    if not quiet:
        print("\n".join(lines))
    return 0 if ok else 1
