"""Stopping a run on SIGTERM/SIGINT at a safe point.

The first signal sets ``STOP``. A stage that stops itself (training: it saves a checkpoint first,
see ``tasks/train_steps.py``) runs inside :func:`safe_points` and checks ``STOP`` at its safe
points; anywhere else the signal raises :class:`RunInterrupted` at once, which is safe because a
stage directory only looks complete once its manifest is written last (``tasks/stage_dir.py``).
A second signal, or ``GRACE_S`` seconds without reaching a safe point, raises at once too.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import signal
import sys
import threading
from typing import Any, Iterator

log = logging.getLogger(__name__)

GRACE_S = 20.0  # the run exits within ~30 s of the signal, whatever the stage is doing
STOP = threading.Event()
_state: dict[str, Any] = {"deferring": 0, "signum": None, "previous": {}}


class RunInterrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM/SIGINT); a KeyboardInterrupt, so that nothing retries
    it (Prefect retries a task on Exception) and Prefect records the runs as crashed."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _runner_cancelling() -> bool:
    """True when a Prefect runner (a worker, `serve`) announced that its SIGTERM cancels the
    flow run: Prefect's own handler then records it as cancelled."""
    if "prefect" not in sys.modules:
        return False
    from prefect._internal import control_listener

    return control_listener.get_intent() is not None


def _handler(signum: int, frame: Any) -> None:
    previous = _state["previous"].get(signum)
    if signum == signal.SIGTERM and callable(previous) and _runner_cancelling():
        previous(signum, frame)  # Prefect's handler: the run ends as cancelled
        return
    first = not STOP.is_set()
    STOP.set()
    _state["signum"] = _state["signum"] or signum
    if first and _state["deferring"]:
        log.warning("%s received: stopping at the next safe point (training saves a checkpoint "
                    "first); send it again to stop at once", signal.Signals(signum).name)
        timer = _state["timer"] = threading.Timer(GRACE_S, _thread.interrupt_main,
                                                  args=(signal.SIGINT,))
        timer.daemon = True
        timer.start()
        return
    _stopping()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Handle SIGTERM and SIGINT as above while inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    outer, _state["previous"] = _state["previous"], previous
    try:
        yield
    finally:
        _state["previous"] = outer
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """Inside, a first signal only sets STOP: the code checks it at its own safe points."""
    check()
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    check()


def check() -> None:
    """Raise RunInterrupted when a stop was asked for (call at a safe point)."""
    if STOP.is_set():
        _stopping()


def _stopping() -> None:
    """Raise RunInterrupted; the grace timer is no longer needed (the run is on its way out)."""
    if _state.get("timer") is not None:
        _state["timer"].cancel()
        _state["timer"] = None
    raise RunInterrupted(_state["signum"] or signal.SIGTERM)


def stop_requested() -> bool:
    return STOP.is_set()
