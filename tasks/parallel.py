"""Chunks of records judged in worker processes, or in this one, with the same results.

Ingest's filters and PII's analysis both hand chunks to a pool of forked workers (they share the
loaded models and start in milliseconds) and read the results back in submission order, so a
stage's output is the same for any worker count. ``pool_or_here`` is that pool; ``done`` a
result computed here, in the same ``Future`` form.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

MAX_AUTO_WORKERS = 8  # `workers: 0`: one process per CPU up to this

T = TypeVar("T")
R = TypeVar("R")


def worker_count(requested: int) -> int:
    """Worker processes for a stage's `workers` setting: 0 = the CPUs this process may use, up
    to MAX_AUTO_WORKERS (this process then reads and writes for all of them)."""
    if requested > 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, MAX_AUTO_WORKERS))


def done(value: R) -> Future[R]:
    """A result computed here, as a finished Future."""
    future: Future[R] = Future()
    future.set_result(value)
    return future


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int, initializer: Callable[..., None], *initargs: Any) -> None:
    """Pool initializer: the worker gets SIGTERM when the stage's process dies. A forked worker
    otherwise outlives a SIGKILLed stage forever: its siblings hold the task pipe open, so it
    never reads EOF (seen in the suite: two idle workers left for half an hour)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF is the only signal
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    initializer(*initargs)


@contextlib.contextmanager
def pool_or_here(workers: int, here: Callable[[T], R], in_worker: Callable[[T], R],
                 initializer: Callable[..., None], initargs: tuple[Any, ...]
                 ) -> Iterator[tuple[Callable[[T], Future[R]], int]]:
    """(submit, window): ``here`` at once when ``workers`` is 1, else a pool of ``workers``
    processes set up by ``initializer(*initargs)`` running ``in_worker``, with up to ``window``
    chunks in flight."""
    if workers == 1:
        yield (lambda chunk: done(here(chunk))), 0
        return
    # fork where the platform has it; spawn pickles initargs and re-imports in each worker
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_die_with_parent,
                               initargs=(os.getpid(), initializer, *initargs))
    try:
        yield functools.partial(pool.submit, in_worker), 2 * workers
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
