"""Library noise filtered once, where it starts: warnings and log lines of pinned libraries that
no user can act on and that bury the run's own lines. Each entry says why. Called by the CLI
and when the flow module is imported (a worker's flow runs)."""

from __future__ import annotations

import logging
import warnings

from data_contracts.config import FinalError

# (logger, level): INFO/WARNING lines each stage repeats that say nothing the stage's own line
# does not.
QUIET_LOGGERS = {
    # presidio logs each recognizer it loads, in every PII stage: ~10 lines a stage.
    "presidio-analyzer": logging.WARNING,
    # lm-eval logs ~10 INFO lines per model it evaluates (seeds, task paths, contexts), and
    # accelerate one "dataset had no length" line per loglikelihood pass: ~24 lines in evaluate.
    "lm_eval": logging.WARNING,
    "accelerate.accelerator": logging.WARNING,
    # bitsandbytes 0.50 on CPU asks for the `kernels` package, which downloads kernels from the
    # Hub at run time (runs are offline); its own CPU kernel is used instead.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # "Retrying (Retry(total=...))" three times per MLflow call while its server is down; the
    # tracker says once that it does not answer and once that it answers again.
    "urllib3.connectionpool": logging.ERROR,
}

# (message regex, category): warnings from library code calling other libraries' old names.
QUIET_WARNINGS = (
    # transformers 5 renamed gradient checkpointing "activation checkpointing"; trl 1.16 and
    # peft still call the old names (and trl's configs set `gradient_checkpointing`): three
    # FutureWarnings, six console lines, in every training and evaluation.
    (r"`\w*gradient_checkpointing\w*` is deprecated", FutureWarning),
    # distilabel 1.5.3 declares Field(default=None) inside Annotated types (pydantic 2.14).
    (r"The 'default' attribute with value None was provided to the `Field\(\)`", Warning),
)


# Loggers that log a failed run's exception with its traceback: Prefect's task and flow engines.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class _FinalErrorsInOneLine(logging.Filter):
    """Drop the traceback from a log line about a FinalError: its message names the setting or
    file to change, and the 40 lines of engine frames above it only hide that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FinalError):
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = _FinalErrorsInOneLine()


def quiet_library_noise() -> None:
    """Apply QUIET_LOGGERS and QUIET_WARNINGS to this process, and log FinalErrors in one line."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _ONE_LINE not in logger.filters:
            logger.addFilter(_ONE_LINE)
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
