"""What the two recipes of the train stage (tasks/train_sft.py, tasks/train_pref.py) share: the
stage directory's layout, resuming from checkpoints, the launch's rank protocol, choosing the
records to train on, the trainer's schedule, and one run from setup to manifest (TrainRun)."""

from __future__ import annotations

import gc
import json
import logging
import resource
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data_contracts.config import TrainConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.base_model import resolve_base_model
from tasks.chat_templates import check_round_trip, prepare_tokenizer
from data_contracts.stage_outputs import TrainOutput
from tasks.io import read_records
from tasks.stage_dir import StageDir, StageWriter
from tasks.train_model import (
    adapter_to_fp32,
    compute_dtype,
    count_linear4bit,
    load_trainable,
    merge,
    optimizer_name,
    process_state,
)
from tasks.interrupt import safe_points
from tasks.train_steps import cpu_logprob_tiles, early_stopping, training_callbacks

log = logging.getLogger(__name__)

STAGE = "train"
ADAPTER_DIR, MERGED_DIR, CHECKPOINT_DIR = "adapter", "merged", "checkpoints"
HISTORY_FILE = "history.jsonl"
FINGERPRINT_FILE = "ftflow_fingerprint.json"
# Settings that may change between a killed run and its resumption without invalidating the
# checkpoints: how long to train and how often to log, evaluate and save.
RESUMABLE_FIELDS = {"epochs", "max_steps", "eval_steps", "save_steps", "logging_steps"}


@dataclass(frozen=True)
class TrainJob:
    """What the stage was asked to do: the previous stage's directory, where to write, the config
    and seed, and its stage directory (whose input digests the manifest records)."""

    input_path: str | Path
    out: Path
    cfg: TrainConfig
    home: str | Path
    seed: int
    stage: StageDir

    @property
    def digests(self) -> dict[str, str]:
        return self.stage.digests


# --- checkpoints -----------------------------------------------------------------------------

def _fingerprint(cfg: TrainConfig, digests: dict[str, str], seed: int) -> dict[str, Any]:
    settings = cfg.model_dump(mode="json", exclude=RESUMABLE_FIELDS)
    return {"config": settings, "inputs": digests, "seed": seed}


def _last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The highest checkpoint-N whose trainer state was written (the trainer writes it last).

    transformers' get_last_checkpoint takes the highest folder even when a kill interrupted
    its saving, and resuming from that half-written folder fails.
    """
    done = [p for p in ckpt_dir.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _resume_point(ckpt_dir: Path, fingerprint: dict[str, Any]) -> str | None:
    """The last checkpoint of an interrupted run of the same job, else None (stale ones go)."""
    marker = ckpt_dir / FINGERPRINT_FILE
    if ckpt_dir.is_dir():
        same = marker.exists() and json.loads(marker.read_text()) == fingerprint
        last = _last_complete_checkpoint(ckpt_dir) if same else None
        if last:
            log.info("resuming from %s", last)
            return last
        if not same:
            log.info("checkpoints in %s belong to another config or input; removing", ckpt_dir)
            shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(fingerprint, sort_keys=True))
    return None


# --- the launch's processes ------------------------------------------------------------------

def _save_adapter(trainer: Any, adapter_dir: Path, is_main: bool) -> None:
    """The LoRA adapter as safetensors, written by the main process only.

    Under FSDP the adapter's weights are sharded: every process must take part in gathering
    them (a full state dict), and the trainer's save does that collectively.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(adapter_dir))
        if is_main:
            (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: not exported
    elif is_main:
        trainer.model.save_pretrained(str(adapter_dir))


class Ranks:
    """The processes `accelerate launch` started for this stage; one process when not launched.

    Every process trains (DDP splits the batches, FSDP the weights), and only the main one
    writes the stage: records, the checkpoint marker, adapter, merged model and manifest.
    Shared by SFT and DPO/ORPO so both follow one protocol.
    """

    def __init__(self) -> None:
        self.state = process_state()
        self.is_main = self.state is None or self.state.is_main_process
        self.world_size = self.state.num_processes if self.state is not None else 1
        # The others keep their (identical) selection of records in a scratch directory.
        self._scratch = None if self.is_main else Path(tempfile.mkdtemp(prefix="ftflow-rank"))

    def writer(self, stage: StageDir) -> StageWriter:
        return stage.writer(into=self._scratch)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def resume_point(self, ckpt_dir: Path, fingerprint: dict[str, Any]) -> str | None:
        """The main process may remove stale checkpoints and writes the marker: it goes first."""
        resume_from = _resume_point(ckpt_dir, fingerprint) if self.is_main else None
        self.barrier()
        return resume_from if self.is_main else _resume_point(ckpt_dir, fingerprint)

    def save_adapter(self, trainer: Any, adapter_dir: Path) -> Manifest | None:
        """Write the adapter (collectively where it is sharded). On the other processes the stage
        ends here: the returned manifest says so; the main one gets None and goes on."""
        if self.is_main:
            shutil.rmtree(adapter_dir, ignore_errors=True)
        self.barrier()
        _save_adapter(trainer, adapter_dir, self.is_main)
        if self.is_main:
            return None
        # The main process merges (minutes for an 8B model): no barrier after this point, or
        # the others could hit the process group's timeout waiting for it.
        shutil.rmtree(self._scratch, ignore_errors=True)
        return Manifest(stage=STAGE, info={"rank": self.state.process_index,
                                           "main_process": False})


# --- records ---------------------------------------------------------------------------------

# Why a record is not trained on: the filter's reason and details for the ledger, or None.
Rejection = Callable[[ChatSample], tuple[str, dict[str, Any]] | None]


def read_splits(input_path: str | Path) -> dict[str, list[ChatSample]]:
    """The previous stage's train split (``train-*``) and held-out split (``heldout-*``)."""
    return {"train": list(read_records(input_path, "train")),
            "heldout": list(read_records(input_path, "heldout"))}


def keep_usable(splits: dict[str, list[ChatSample]], writer: StageWriter,
                reject: Rejection) -> tuple[list[ChatSample], list[ChatSample]]:
    """(train, eval) records that `reject` lets through; the others are dropped with its reason."""
    used: dict[str, list[ChatSample]] = {"train": [], "heldout": []}
    for split, records in splits.items():
        for rec in records:
            rejection = reject(rec)
            if rejection is not None:
                reason, details = rejection
                writer.drop(rec, reason, split=split, **details)
            else:
                writer.keep(rec, split)
                used[split].append(rec)
    return used["train"], used["heldout"]


# --- trainer ---------------------------------------------------------------------------------

def trainer_args(cfg: TrainConfig, ckpt_dir: Path, cuda: bool, optim: str, has_eval: bool,
                 seed: int) -> dict[str, Any]:
    """The training arguments both recipes share: schedule, batches, evaluation, checkpoints,
    logging, precision and seeds."""
    import torch

    dtype = compute_dtype(cuda)
    early = early_stopping(cfg, has_eval)
    best = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
            "greater_is_better": False} if early else {}
    return dict(
        output_dir=str(ckpt_dir), max_length=cfg.max_length,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a ratio
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_steps,
        eval_on_start=has_eval,  # step 0: the base model's eval loss starts the curve
        # Early stopping exports the best checkpoint, so there must be one at every evaluation.
        save_strategy="steps", save_steps=cfg.eval_steps if early else cfg.save_steps,
        save_total_limit=2, **best,
        logging_steps=cfg.logging_steps, report_to=[], use_cpu=not cuda, optim=optim,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        seed=seed, data_seed=seed, disable_tqdm=True,
    )


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w") as fh:
        for entry in history:
            fh.write(json.dumps(entry) + "\n")


def last(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return float(values[-1]) if values else None


# --- one run ---------------------------------------------------------------------------------

class TrainRun:
    """One run of the stage, as both recipes set it up and end it.

    The constructor resolves the base model, loads the tokenizer with its chat template and
    joins the launch's processes; `load_model` loads the base to train and finds the checkpoint
    to resume from; the recipe builds its trainer into `trainer`; `train_and_finish` trains and
    writes the stage. The run, not the recipe, holds the model and the trainer, so that it can
    let go of them before the merge loads a second, full-precision copy of the base.
    """

    model: Any = None  # load_model: the base to train
    trainer: Any = None  # the recipe's trainer, built on model

    def __init__(self, job: TrainJob) -> None:
        import torch

        self.job, self.cfg = job, job.cfg
        self.base = resolve_base_model(job.cfg.base_model, job.home)
        self.cuda = torch.cuda.is_available()
        self.tokenizer, self.template_source = prepare_tokenizer(self.base, job.cfg)
        self.ranks = Ranks()  # under `accelerate launch`: all train, the main process writes
        self.writer = self.ranks.writer(job.stage)

    def load_model(self) -> None:
        """The base to train, (Q)LoRA-ready, into `model`; the optimizer; the resume point."""
        cfg, job = self.cfg, self.job
        self.model, self.quantized, self.fallback_reason = load_trainable(self.base, cfg,
                                                                          self.cuda)
        self.optimizer = optimizer_name(cfg, self.cuda, self.fallback_reason)
        self.ckpt_dir = job.out / CHECKPOINT_DIR
        self.resume_from = self.ranks.resume_point(self.ckpt_dir,
                                                   _fingerprint(cfg, job.digests, job.seed))

    def trainer_args(self, has_eval: bool) -> dict[str, Any]:
        """The shared training arguments (trainer_args) for this run, after load_model."""
        return trainer_args(self.cfg, self.ckpt_dir, self.cuda, self.optimizer, has_eval,
                            self.job.seed)

    def callbacks(self, has_eval: bool) -> list[Any]:
        """The trainer's callbacks; the run keeps the start step, the token count and whether
        early stopping is on, for the manifest."""
        self.start, self.stats, every, self.early = training_callbacks(self.cfg, has_eval,
                                                                       self.cuda)
        return every

    def train_and_finish(self, *, records_in: int, has_eval: bool, check_row: dict[str, Any],
                         expected_ids: list[int], info: dict[str, Any],
                         logprob_tiles: bool = False,
                         recipe_metrics: Callable[[list[dict[str, Any]]], dict[str, float]]
                         | None = None) -> Manifest:
        """Train, evaluate the model we export, save the adapter, merge it into the base, check
        the saved template's round trip on `check_row` (training saw `expected_ids` for it), and
        write history and manifest, with the recipe's `info` and `recipe_metrics` added.

        `logprob_tiles` bounds the memory of trl's fused LM head on CPU (cpu_logprob_tiles).
        """
        cfg, out, trainer = self.cfg, self.job.out, self.trainer
        self.stats.count_batches(trainer)  # ORPO does not count tokens itself
        adapter_to_fp32(trainer.model)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        linear4bit = count_linear4bit(trainer.model)
        with cpu_logprob_tiles(logprob_tiles):
            # SIGTERM/SIGINT: the callback saves a checkpoint and ends training, then this raises
            # before anything of the stage's output is written (tasks/interrupt.py).
            with safe_points():
                result = trainer.train(resume_from_checkpoint=self.resume_from)
            best_step = self._final_evaluation(has_eval)
        history = trainer.state.log_history
        tokens_seen = float(getattr(trainer, "_total_train_tokens", 0) or self.stats.counted)

        adapter_dir, merged_dir = out / ADAPTER_DIR, out / MERGED_DIR
        if (not_main := self.ranks.save_adapter(trainer, adapter_dir)) is not None:
            return not_main
        self.tokenizer.save_pretrained(str(adapter_dir))
        final_step, planned_steps = trainer.state.global_step, trainer.state.max_steps
        del trainer
        self.trainer = self.model = None
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
        merge(self.base, adapter_dir, merged_dir, self.tokenizer, cfg, self.template_source)
        check_round_trip(merged_dir, check_row, expected_ids, cfg)
        write_history(out / HISTORY_FILE, history)

        runtime = float(result.metrics.get("train_runtime", 0.0))
        metrics: dict[str, float] = {
            "train_loss": last(history, "loss") or float(result.training_loss),
            "train_runtime_s": runtime,
            "train_tokens_per_s": tokens_seen / runtime if runtime > 0 else 0.0,
            "train_tokens": tokens_seen,
            "trainable_params": float(trainable),
            "trainable_share": trainable / total if total else 0.0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "steps": float(final_step),
            "steps_run": float(final_step - self.start.step),
        }
        eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
        if eval_losses:
            metrics["eval_loss"] = float(eval_losses[-1])
            metrics["eval_loss_initial"] = float(eval_losses[0])
        if recipe_metrics is not None:
            metrics.update(recipe_metrics(history))
        info = {
            "adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir),
            "base_model": self.base, "quantized": self.quantized,
            "linear4bit_modules": linear4bit, "method": cfg.method,
            "fallback_reason": self.fallback_reason, "optimizer": self.optimizer,
            "history_file": str(out / HISTORY_FILE), "chat_template": self.template_source,
            "device": "cuda" if self.cuda else "cpu",
            "compute_dtype": str(compute_dtype(self.cuda)).removeprefix("torch."),
            "resumed_from_step": self.start.step, "seed": self.job.seed,
            "use_dora": cfg.lora.use_dora, "early_stopping": self.early, "best_step": best_step,
            "stopped_early": self.early and final_step < planned_steps,
            "world_size": self.ranks.world_size, **info,
        }
        log.info("%s on %s for %d steps (from %d): train loss %.3f, eval loss %s",
                 cfg.objective, self.base, final_step, self.start.step, metrics["train_loss"],
                 metrics.get("eval_loss"))
        return self.writer.finish(records_in, metrics=metrics, info=info,
                                  output=TrainOutput.model_validate(info),
                                  outputs=[adapter_dir, merged_dir, out / HISTORY_FILE])

    def _final_evaluation(self, has_eval: bool) -> int | None:
        """Evaluate the model we export unless the last evaluation already was of it; returns
        the best step when early stopping loaded the best checkpoint."""
        state = self.trainer.state
        evaluated = [h["step"] for h in state.log_history if "eval_loss" in h]
        best_step = state.best_global_step if self.early else None
        loaded_best = best_step is not None and best_step != state.global_step
        if has_eval and (loaded_best or not evaluated or evaluated[-1] != state.global_step):
            self.trainer.evaluate()  # the final held-out metrics, of the model we export
        return best_step
