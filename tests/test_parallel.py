"""The worker pool that ingest and PII share: workers never outlive a killed stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import os, sys, time
    from tasks.parallel import pool_or_here

    def noop(*args):
        pass

    def pid(chunk):
        time.sleep(0.05)  # long enough that both workers take some
        return os.getpid()

    with pool_or_here(2, lambda c: c, pid, noop, ()) as (submit, window):
        pids = {submit(i).result() for i in range(20)}
        print(" ".join(map(str, sorted(pids))), flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] not in "ZX"


def test_pool_workers_die_with_a_killed_stage() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers and proc.pid not in workers and all(_alive(p) for p in workers)
    proc.send_signal(signal.SIGKILL)  # what a SIGKILLed stage does to its pool
    proc.wait()
    deadline = time.monotonic() + 60  # liveness, not speed: they used to stay forever
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"pool workers {left} outlived the killed stage"


def test_one_worker_runs_here() -> None:
    from tasks.parallel import pool_or_here

    with pool_or_here(1, lambda c: (os.getpid(), c), None, None, ()) as (submit, window):
        assert submit("x").result() == (os.getpid(), "x") and window == 0
