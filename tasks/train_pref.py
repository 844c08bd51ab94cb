"""Stage 5 on preference pairs: DPO or ORPO (trl) with the same (Q)LoRA machinery as SFT.

Reads the preference records (prompt turns + a chosen and a rejected reply) of the previous
stage's train and held-out splits, trains a LoRA adapter on the 4-bit NF4 base (bitsandbytes, on
CPU too), resumes from the last checkpoint, and writes the same stage directory as
``tasks/train.py``: ``adapter/``, ``merged/`` (both with the chat template), ``checkpoints/``,
``history.jsonl`` (loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
and their ``eval_`` twins on the held-out pairs) and ``manifest.json``.

DPO needs a reference model. With a LoRA adapter trl computes it with the adapter disabled, so the
reference is the (4-bit) base itself and no second copy is loaded. That reference pass runs
without gradients, which on CPU would make bitsandbytes repack the 4-bit weights for inference
(see ``tasks.train._keep_4bit_trainable``, applied by ``_load_model``). ORPO needs no reference.
"""

from __future__ import annotations

import gc
import logging
import resource
from pathlib import Path
from typing import Any

from data_contracts.config import TrainConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.base_model import resolve_base_model
from data_contracts.stage_outputs import TrainOutput
from tasks.io import read_records
from tasks.stage_dir import StageDir, StageWriter
from tasks.train import (
    ADAPTER_DIR,
    STAGE,
    CHECKPOINT_DIR,
    HISTORY_FILE,
    MERGED_DIR,
    Ranks,
    _adapter_to_fp32,
    _callbacks,
    _check_round_trip,
    _compute_dtype,
    _count_linear4bit,
    _early_stopping,
    _encode,
    _fingerprint,
    _last,
    _load_trainable,
    _merge,
    _optimizer,
    _prepare_tokenizer,
    _write_history,
)

log = logging.getLogger(__name__)

OBJECTIVES = ("dpo", "orpo")
# What trl logs for a preference objective; the last value of each goes into the manifest.
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


# --- records -------------------------------------------------------------------------------

def pref_row(rec: ChatSample) -> dict[str, Any]:
    """A pair in trl's conversational preference form: prompt turns, then one reply each."""
    return {
        "prompt": [m.model_dump() for m in rec.messages],
        "chosen": [{"role": "assistant", "content": rec.chosen}],
        "rejected": [{"role": "assistant", "content": rec.rejected}],
    }


def _prompt_length(rec: ChatSample, tokenizer: Any, objective: str) -> int:
    """Tokens the prompt takes in training, generation prompt included.

    ORPO tokenizes the rendered text without special tokens and then prepends the BOS token
    when the template did not write it; DPO uses the template's ids as they are.
    """
    ids = list(tokenizer.apply_chat_template(
        pref_row(rec)["prompt"], tokenize=True, return_dict=True,
        add_generation_prompt=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if objective == "orpo" and bos is not None and (not ids or ids[0] != bos):
        return len(ids) + 1
    return len(ids)


def _select_pairs(input_path: str | Path, writer: StageWriter, tokenizer: Any,
                  cfg: TrainConfig) -> tuple[list[ChatSample], list[ChatSample], int]:
    """Keep the preference pairs of both splits; every other record is dropped with a reason."""
    train = list(read_records(input_path, "data"))
    heldout = list(read_records(input_path, "heldout"))
    used: dict[str, list[ChatSample]] = {"train": [], "eval": []}
    for split, records in (("train", train), ("eval", heldout)):
        for rec in records:
            if rec.kind != "preference":
                writer.drop(rec, f"{rec.kind}_in_preference_run", split=split)
                continue
            prompt_len = _prompt_length(rec, tokenizer, cfg.objective)
            if prompt_len >= cfg.max_length:
                # No reply token would be left after truncation: trl would drop (DPO) or train
                # on an empty reply (ORPO, a NaN loss). Either way it is no training example.
                writer.drop(rec, "prompt_fills_max_length", split=split,
                            prompt_tokens=prompt_len, max_length=cfg.max_length)
                continue
            writer.keep(rec, split)
            used[split].append(rec)
    if not used["train"]:
        raise ValueError(f"{input_path}: no usable preference pairs for {cfg.objective}")
    return used["train"], used["eval"], len(train) + len(heldout)


# --- trainer -------------------------------------------------------------------------------

def _pref_config(cfg: TrainConfig, ckpt_dir: Path, cuda: bool, optim: str, has_eval: bool,
                 seed: int) -> Any:
    """DPOConfig or ORPOConfig with the SFT stage's schedule, checkpointing and logging."""
    import torch

    dtype = _compute_dtype(cuda)
    early = _early_stopping(cfg, has_eval)
    best = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
            "greater_is_better": False} if early else {}
    common: dict[str, Any] = dict(
        output_dir=str(ckpt_dir), max_length=cfg.max_length, beta=cfg.beta,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a ratio
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_steps,
        eval_on_start=has_eval,  # step 0: the base model starts every curve
        save_strategy="steps", save_steps=cfg.eval_steps if early else cfg.save_steps,
        save_total_limit=2, **best,
        logging_steps=cfg.logging_steps, report_to=[], use_cpu=not cuda, optim=optim,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        seed=seed, data_seed=seed, disable_tqdm=True,
    )
    if cfg.objective == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common)
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**common)


def _build_trainer(cfg: TrainConfig, model: Any, args: Any, tokenizer: Any,
                   train_recs: list[ChatSample], eval_recs: list[ChatSample],
                   callbacks: list[Any]) -> Any:
    from datasets import Dataset
    from peft import LoraConfig

    peft_config = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, use_dora=cfg.lora.use_dora, task_type="CAUSAL_LM",
    )
    data = {"train_dataset": Dataset.from_list([pref_row(r) for r in train_recs]),
            "eval_dataset": Dataset.from_list([pref_row(r) for r in eval_recs]) if eval_recs
            else None}
    if cfg.objective == "dpo":
        from trl import DPOTrainer

        # No ref_model: with peft_config trl takes the base with the adapter disabled.
        return DPOTrainer(model, args=args, processing_class=tokenizer, peft_config=peft_config,
                          callbacks=callbacks, **data)
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer(model, args=args, processing_class=tokenizer, peft_config=peft_config,
                       callbacks=callbacks, **data)


def _reference_model(trainer: Any, objective: str) -> str | None:
    """How DPO gets its reference: 'adapter_disabled' means no second model in memory."""
    if objective != "dpo":
        return None  # ORPO is reference-free
    return "adapter_disabled" if getattr(trainer, "ref_model", None) is None else "separate_copy"


def _reward_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """Last train and eval values of trl's reward metrics, plus the first eval ones (step 0)."""
    out: dict[str, float] = {}
    for key in REWARD_KEYS:
        for name in (key, f"eval_{key}"):
            value = _last(history, name)
            if value is not None:
                out[name] = value
        first = [h[f"eval_{key}"] for h in history if f"eval_{key}" in h]
        if first:
            out[f"eval_{key}_initial"] = float(first[0])
    return out


# --- the stage -------------------------------------------------------------------------------

def run_train_pref(input_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                   home: str | Path, seed: int = 42) -> Manifest:
    """Align the base model with DPO or ORPO ((Q)LoRA) on the input's preference pairs."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"train.objective is {cfg.objective!r}; run_train_pref trains "
                         f"{' or '.join(OBJECTIVES)}")
    out = Path(out_dir)
    stage = StageDir(out, STAGE, cfg.digest(), input_path)
    if (done := stage.finished()) is not None:
        return done
    digests = stage.digests

    import torch

    base = resolve_base_model(cfg.base_model, home)
    cuda = torch.cuda.is_available()
    tokenizer, template_source = _prepare_tokenizer(base, cfg)
    ranks = Ranks()  # under `accelerate launch`: all train, the main process writes
    writer = ranks.writer(stage)
    train_recs, eval_recs, records_in = _select_pairs(input_path, writer, tokenizer, cfg)

    # k-bit preparation: DPOTrainer does not do it itself (ORPOTrainer does, again, harmlessly).
    model, quantized, fallback_reason = _load_trainable(base, cfg, cuda)
    optim = _optimizer(cfg, cuda, fallback_reason)
    ckpt_dir = out / CHECKPOINT_DIR
    resume_from = ranks.resume_point(ckpt_dir, _fingerprint(cfg, digests, seed))

    # The round trip check compares the exported tokenizer on what DPO/ORPO render: prompt+chosen.
    check_row = {"messages": [m.model_dump() for m in train_recs[0].conversation()]}
    expected_ids = _encode(tokenizer, check_row)
    args = _pref_config(cfg, ckpt_dir, cuda, optim, bool(eval_recs), seed)
    start, stats, callbacks, early = _callbacks(cfg, bool(eval_recs), cuda)
    trainer = _build_trainer(cfg, model, args, tokenizer, train_recs, eval_recs, callbacks)
    stats.count_batches(trainer)  # ORPO does not count tokens itself
    _adapter_to_fp32(trainer.model)
    reference = _reference_model(trainer, cfg.objective)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    linear4bit = _count_linear4bit(trainer.model)
    result = trainer.train(resume_from_checkpoint=resume_from)
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    best_step = trainer.state.best_global_step if early else None
    loaded_best = best_step is not None and best_step != trainer.state.global_step
    if eval_recs and (loaded_best or not evaluated or evaluated[-1] != trainer.state.global_step):
        trainer.evaluate()  # the final held-out metrics, of the model we export
    history = trainer.state.log_history
    tokens_seen = float(getattr(trainer, "_total_train_tokens", 0) or stats.counted)

    adapter_dir, merged_dir = out / ADAPTER_DIR, out / MERGED_DIR
    if (not_main := ranks.save_adapter(trainer, adapter_dir)) is not None:
        return not_main
    tokenizer.save_pretrained(str(adapter_dir))
    final_step, planned_steps = trainer.state.global_step, trainer.state.max_steps
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    _merge(base, adapter_dir, merged_dir, tokenizer, cfg, template_source)
    _check_round_trip(merged_dir, check_row, expected_ids, cfg)
    _write_history(out / HISTORY_FILE, history)

    runtime = float(result.metrics.get("train_runtime", 0.0))
    metrics: dict[str, float] = {
        "train_loss": _last(history, "loss") or float(result.training_loss),
        "train_runtime_s": runtime,
        "trainable_params": float(trainable),
        "trainable_share": trainable / total if total else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": float(final_step),
        "steps_run": float(final_step - start.step),
    }
    if tokens_seen:
        metrics["train_tokens"] = tokens_seen
        metrics["train_tokens_per_s"] = tokens_seen / runtime if runtime > 0 else 0.0
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    if eval_losses:
        metrics["eval_loss"] = float(eval_losses[-1])
        metrics["eval_loss_initial"] = float(eval_losses[0])
    metrics.update(_reward_metrics(history))
    info = {
        "adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir), "base_model": base,
        "objective": cfg.objective, "beta": cfg.beta, "reference_model": reference,
        "quantized": quantized, "linear4bit_modules": linear4bit, "method": cfg.method,
        "fallback_reason": fallback_reason, "optimizer": optim,
        "history_file": str(out / HISTORY_FILE), "data_kind": "preference",
        "chat_template": template_source, "device": "cuda" if cuda else "cpu",
        "compute_dtype": str(_compute_dtype(cuda)).removeprefix("torch."),
        "resumed_from_step": start.step, "seed": seed, "use_dora": cfg.lora.use_dora,
        # trl's preference datasets have no length column to group by, and no packing.
        "group_by_length": False, "packing": False,
        "early_stopping": early, "best_step": best_step,
        "stopped_early": early and final_step < planned_steps,
        "world_size": ranks.world_size,
    }
    log.info("%s on %s for %d steps (from %d): train loss %.3f, eval reward accuracy %s",
             cfg.objective, base, final_step, start.step, metrics["train_loss"],
             metrics.get("eval_rewards/accuracies"))
    return writer.finish(records_in, metrics=metrics, info=info,
                         output=TrainOutput.model_validate(info),
                         outputs=[adapter_dir, merged_dir, out / HISTORY_FILE])
