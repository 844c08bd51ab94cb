"""The stages of a run, declared once, in order: the flow, ``ftflow stage``, the report and the
tests all read this list. Adding a stage is one entry here and one module in ``tasks/``.

Each entry names its directory in a run (``05-pii-synthetic``), the command and module that run
it (``pii``), its config section, the earlier stage directories it reads, what it does with the
held-out split, and how Prefect retries it. Stage modules are imported only when their stage
runs: ``ftflow stage pii`` does not import torch, and nothing here imports Prefect until the
flow asks for a task (:func:`stage_task`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from data_contracts.config import FinalError, PipelineConfig
from data_contracts.manifest import LedgerError, Manifest
from tasks.io import is_stage_dir

# What a stage does with the held-out split: "carry" (copied through untouched) and "transform"
# (every record rewritten, none dropped: PII) keep its size, which run_stage checks; "create"
# carves it (dedup); "use" reads it (train, evaluate); "none" never sees records (export).
HeldoutUse = Literal["carry", "transform", "create", "use", "none"]


@dataclass(frozen=True)
class StageContext:
    """Everything a stage call needs: the run's config, where to read and where to write."""

    cfg: PipelineConfig
    out: Path
    inputs: tuple[Any, ...]  # stage dirs in the order of StageSpec.reads, or the raw inputs
    tracking_uri: str = ""
    parent_run_id: str | None = None
    incremental: bool = False  # a run on newly arrived files: dedup against the curated corpus
    run_id: str = ""

    @property
    def home(self) -> Path:
        return Path(self.cfg.run.home)


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline."""

    name: str  # its directory in a run and its Prefect task-run name
    command: str  # `ftflow stage COMMAND`; the module tasks/COMMAND.py
    section: str  # the config section that configures it
    reads: tuple[str, ...]  # earlier stage directories it reads, in order; () = raw inputs
    heldout: HeldoutUse
    call: Callable[[StageContext], Manifest]
    retries: int = 2
    retry_delays_s: tuple[int, ...] = (2, 10)

    def config(self, cfg: PipelineConfig) -> Any:
        return getattr(cfg, self.section)

    def timeout_s(self, cfg: PipelineConfig) -> float:
        return float(getattr(cfg.run.timeouts, self.command))


def _ingest(c: StageContext) -> Manifest:
    from tasks.ingest import run_ingest

    return run_ingest(c.inputs[0], c.out, c.cfg.ingest, home=c.home,
                      base_model=c.cfg.train.base_model,
                      trust_remote_code=c.cfg.train.trust_remote_code)


def _pii(c: StageContext) -> Manifest:
    from tasks.pii import run_pii

    return run_pii(c.inputs[0], c.out, c.cfg.pii, home=c.home)


def _dataset(c: StageContext) -> str:
    return c.cfg.curate.dataset or c.cfg.run.name


def _dedup(c: StageContext) -> Manifest:
    from tasks.dedup import run_dedup

    return run_dedup(c.inputs[0], c.out, c.cfg.dedup, home=c.home, seed=c.cfg.run.seed)


def _dedup_new(c: StageContext) -> Manifest:
    """The first dedup: on a run on newly arrived files, also against the curated corpus."""
    from tasks.curate import index_files
    from tasks.dedup import run_dedup

    corpus = index_files(c.home, _dataset(c)) if c.incremental else None
    return run_dedup(c.inputs[0], c.out, c.cfg.dedup, home=c.home, seed=c.cfg.run.seed,
                     corpus=corpus)


def _curate(c: StageContext) -> Manifest:
    from tasks.curate import run_curate

    return run_curate(c.inputs[0], c.out, c.cfg.curate, home=c.home, dataset=_dataset(c),
                      mode="incremental" if c.incremental else "full", run_id=c.run_id)


def _augment(c: StageContext) -> Manifest:
    from tasks.augment import run_augment

    return run_augment(c.inputs[0], c.out, c.cfg.augment, home=c.home,
                       base_model=c.cfg.train.base_model)


def _train(c: StageContext) -> Manifest:
    from tasks.train import run_train

    return run_train(c.inputs[0], c.out, c.cfg.train, home=c.home, seed=c.cfg.run.seed)


def _evaluate(c: StageContext) -> Manifest:
    from tasks.evaluate import run_evaluate

    return run_evaluate(c.inputs[0], c.inputs[1], c.out, c.cfg.evaluate, home=c.home,
                        judge_teacher=c.cfg.augment.teacher)


def _export(c: StageContext) -> Manifest:
    from tasks.export import run_export

    return run_export(c.inputs[0], c.inputs[1], c.out, c.cfg.export,
                      tracking_uri=c.tracking_uri or c.cfg.run.resolved_tracking_uri(),
                      parent_run_id=c.parent_run_id, home=c.home,
                      run_config=c.cfg.model_dump(mode="json"))


STAGES: tuple[StageSpec, ...] = (
    StageSpec("01-ingest", "ingest", "ingest", (), "none", _ingest),
    StageSpec("02-pii", "pii", "pii", ("01-ingest",), "transform", _pii),
    StageSpec("03-dedup", "dedup", "dedup", ("02-pii",), "create", _dedup_new),
    # The versioned curated dataset: this run's records (added to the earlier ones on a run on
    # newly arrived files). Everything after it reads the whole curated version.
    StageSpec("04-curate", "curate", "curate", ("03-dedup",), "create", _curate),
    StageSpec("05-augment", "augment", "augment", ("04-curate",), "carry", _augment),
    # Synthetic rows go through the same scrub and dedup as real ones.
    StageSpec("06-pii-synthetic", "pii", "pii", ("05-augment",), "transform", _pii),
    StageSpec("07-dedup-synthetic", "dedup", "dedup", ("06-pii-synthetic",), "create", _dedup),
    StageSpec("08-train", "train", "train", ("07-dedup-synthetic",), "use", _train,
              retries=1, retry_delays_s=(10,)),
    StageSpec("09-evaluate", "evaluate", "evaluate", ("07-dedup-synthetic", "08-train"), "use",
              _evaluate),
    StageSpec("10-export", "export", "export", ("08-train", "09-evaluate"), "none", _export),
)
# The last stage of curation: a run on newly arrived files may end here (curate.min_new_records).
CURATION_END = "04-curate"
COMMANDS: tuple[str, ...] = tuple(dict.fromkeys(s.command for s in STAGES))


def spec(name_or_command: str) -> StageSpec:
    """The stage with this directory name, or the first one run by this command."""
    for s in STAGES:
        if name_or_command in (s.name, s.command):
            return s
    raise KeyError(f"no stage named {name_or_command!r} (stages: {', '.join(COMMANDS)})")


def _heldout_count(source: Any) -> int | None:
    """Held-out records in a stage directory; None for raw inputs."""
    if not is_stage_dir(source):
        return None
    return Manifest.read(source).splits.get("heldout", 0)


def run_stage(s: StageSpec, ctx: StageContext) -> Manifest:
    """Run one stage and check what every stage owes the next: a ledger that adds up and, for a
    stage that carries or transforms the held-out split, every held-out record."""
    manifest = s.call(ctx)
    if manifest.info.get("main_process") is False:
        return manifest  # another rank of an `accelerate launch` writes and checks the stage
    manifest.check()
    if s.heldout in ("carry", "transform") and ctx.inputs:
        before = _heldout_count(ctx.inputs[0])
        after = manifest.splits.get("heldout", 0)
        if before is not None and before != after:
            raise LedgerError(f"stage {s.name}: {before} held-out records in, {after} out; a "
                              f"stage that {s.heldout}s the held-out split must keep every one")
    return manifest


def retry_unless_final(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for a stage: a FinalError (a bad setting, a refused model file,
    a teacher that refused us) fails the stage at once; anything else goes to its retries."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception:  # the state's result cannot be read back: keep the retry policy
        return True
    return not isinstance(err, FinalError)


def stage_task(s: StageSpec, cfg: PipelineConfig) -> Any:
    """The Prefect task that runs a stage in the flow: every task option in one place."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    # Content digests decide what reruns (tasks/stage_dir.py): Prefect's own cache stays off.
    return task(run_stage, name=s.name, task_run_name=s.name, retries=s.retries,
                retry_delay_seconds=list(s.retry_delays_s), retry_condition_fn=retry_unless_final,
                timeout_seconds=s.timeout_s(cfg),
                cache_policy=NO_CACHE, tags=["ftflow", f"ftflow-{s.command}"])
