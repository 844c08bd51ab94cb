"""How far a stage is: a terminal progress bar and, inside a Prefect task run, a progress artifact.

Every stage gets it through its ``StageWriter`` (records written) and training through a trainer
callback (steps, with the loss). The bar is tqdm's, shown only on a terminal (``disable=None``);
the artifact is updated at most every few seconds so a million records cost a few API calls.
Prefect is never imported here: the artifact exists only when the stage already runs in a
Prefect task, so ``ftflow stage`` and accelerate ranks stay Prefect-free.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

ARTIFACT_EVERY_S = 3.0


def _prefect_task_run() -> bool:
    """True inside a Prefect task run (only if Prefect is already imported)."""
    if "prefect.context" not in sys.modules:
        return False
    from prefect.context import TaskRunContext

    return TaskRunContext.get() is not None


class Progress:
    """Counts units of work of one stage; shows them in the terminal and the Prefect UI."""

    def __init__(self, stage: str, total: int | None = None, unit: str = "records") -> None:
        from tqdm.auto import tqdm

        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self._bar = tqdm(total=total, desc=stage, unit=f" {unit}", disable=None, leave=False,
                         dynamic_ncols=True, mininterval=0.5)
        self._artifact: Any = None
        self._last_push = 0.0
        if _prefect_task_run():
            self._artifact = self._create_artifact()

    def _describe(self) -> str:
        of = f" of {self.total:,}" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.stage}: {self.done:,}{of} {self.unit}{extra}"

    def _percent(self) -> float:
        return min(100.0, 100.0 * self.done / self.total) if self.total else 0.0

    def _create_artifact(self) -> Any:
        from prefect.artifacts import create_progress_artifact

        try:
            return create_progress_artifact(0.0, description=self._describe())
        except Exception as err:  # progress is a courtesy: never fail a stage for it
            log.debug("no progress artifact: %s", err)
            return None

    def _push(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._artifact is None or (not force and now - self._last_push < ARTIFACT_EVERY_S):
            return
        self._last_push = now
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self._artifact, self._percent(), description=self._describe())
        except Exception as err:
            log.debug("progress artifact not updated: %s", err)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """n more units done; postfix values (a loss, a rejection count) are shown beside."""
        self.done += n
        self._bar.update(n)
        if postfix:
            self.postfix.update(postfix)
            self._bar.set_postfix(postfix, refresh=False)
        self._push()

    def set_total(self, total: int) -> None:
        self.total = total
        self._bar.total = total
        self._bar.refresh()

    def close(self) -> None:
        if self.total is None or self.done < self.total:
            self.total = self.done  # unknown ahead (raw input), or ended early: it is done
        self._push(force=True)
        self._bar.close()


def trainer_progress(stage: str = "train steps") -> Any:
    """A transformers TrainerCallback that shows training steps with the latest loss."""
    from transformers import TrainerCallback

    class _StepProgress(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.progress: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                self.progress = Progress(stage, state.max_steps or None, unit="steps")
                self.progress.update(state.global_step)  # a resumed run starts part-way

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.update(state.global_step - self.progress.done)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kw: Any) -> None:
            if self.progress is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if k in logs}
                if shown:
                    self.progress.update(0, **shown)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return _StepProgress()
