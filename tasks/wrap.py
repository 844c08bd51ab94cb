"""The Prefect ``@task`` wrapper of a stage, built the first time the pipeline asks for it.

Each stage module keeps its wrapper (retries and tags beside the stage function, DESIGN.md), but
importing the stage function must not import Prefect: ``ftflow stage NAME``, the benchmarks and
every rank that ``accelerate launch`` starts run the plain function, and Prefect is ~45 MB of
resident memory and ~1 s of imports in each of them. A module ``__getattr__`` (PEP 562) makes
``from tasks.train import train_task`` work as before while ``from tasks.train import
run_train`` stays Prefect-free.
"""

from __future__ import annotations

from typing import Any, Callable


def prefect_task(attr: str, fn: Callable[..., Any], module_globals: dict[str, Any],
                 **options: Any) -> Callable[[str], Any]:
    """A module ``__getattr__`` that returns ``task(**options)(fn)`` for ``attr``, built once."""

    def __getattr__(name: str) -> Any:
        if name != attr:
            raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")
        from prefect import task

        wrapped = task(**options)(fn)
        module_globals[attr] = wrapped  # later lookups find it without coming here
        return wrapped

    return __getattr__
