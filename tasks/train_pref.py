"""The preference recipe of the train stage: DPO or ORPO (trl) with the same (Q)LoRA machinery
as SFT (tasks/train_common.py).

Reads the preference records (prompt turns + a chosen and a rejected reply) of the previous
stage's train and held-out splits and writes the same stage directory as SFT: ``adapter/``,
``merged/`` (both with the chat template), ``checkpoints/``, ``history.jsonl`` (loss,
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, and their ``eval_`` twins
on the held-out pairs) and ``manifest.json``.

DPO needs a reference model. With a LoRA adapter trl computes it with the adapter disabled, so the
reference is the (4-bit) base itself and no second copy is loaded. That reference pass runs
without gradients, which on CPU would make bitsandbytes repack the 4-bit weights for inference
(see ``tasks.train_model._keep_4bit_trainable``, applied by ``load_model``). ORPO needs no
reference.
"""

from __future__ import annotations

from typing import Any

from data_contracts.config import TrainConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.chat_templates import encode
from tasks.train_common import TrainJob, TrainRun, keep_usable, last, read_splits
from tasks.train_model import lora_config

OBJECTIVES = ("dpo", "orpo")
# What trl logs for a preference objective; the last value of each goes into the manifest.
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def train_pref(job: TrainJob) -> Manifest:
    """Align the base model with DPO or ORPO ((Q)LoRA) on the input's preference pairs."""
    cfg = job.cfg
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"train.objective is {cfg.objective!r}; train_pref trains "
                         f"{' or '.join(OBJECTIVES)}")
    run = TrainRun(job)  # base model, tokenizer and chat template, this process's rank

    splits = read_splits(job.input_path)

    def reject(rec: ChatSample) -> tuple[str, dict[str, Any]] | None:
        if rec.kind != "preference":
            return f"{rec.kind}_in_preference_run", {}
        prompt_len = _prompt_length(rec, run.tokenizer, cfg.objective)
        if prompt_len >= cfg.max_length:
            # No reply token would be left after truncation: trl would drop (DPO) or train
            # on an empty reply (ORPO, a NaN loss). Either way it is no training example.
            return "prompt_fills_max_length", {"prompt_tokens": prompt_len,
                                               "max_length": cfg.max_length}
        return None

    train_recs, eval_recs = keep_usable(splits, run.writer, reject)
    if not train_recs:
        raise ValueError(f"{job.input_path}: no usable preference pairs for {cfg.objective}")

    # k-bit preparation: DPOTrainer does not do it itself (ORPOTrainer does, again, harmlessly).
    run.load_model()
    # The round trip check compares the exported tokenizer on what DPO/ORPO render: prompt+chosen.
    check_row = {"messages": [m.model_dump() for m in train_recs[0].conversation()]}
    expected_ids = encode(run.tokenizer, check_row)
    has_eval = bool(eval_recs)
    run.trainer = build_pref_trainer(cfg, run.model, pref_config(cfg, run.trainer_args(has_eval)),
                                     run.tokenizer, train_recs, eval_recs,
                                     run.callbacks(has_eval))
    return run.train_and_finish(
        records_in=sum(len(records) for records in splits.values()), has_eval=has_eval,
        check_row=check_row, expected_ids=expected_ids,
        recipe_metrics=reward_metrics,
        info={"objective": cfg.objective, "beta": cfg.beta,
              "reference_model": _reference_model(run.trainer, cfg.objective),
              "data_kind": "preference",
              # trl's preference datasets have no length column to group by, and no packing.
              "group_by_length": False, "packing": False},
    )


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


# --- trainer -------------------------------------------------------------------------------

def pref_config(cfg: TrainConfig, common: dict[str, Any]) -> Any:
    """DPOConfig or ORPOConfig: the training arguments SFT has too (common), and beta."""
    if cfg.objective == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, beta=cfg.beta)
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**common, beta=cfg.beta)


def build_pref_trainer(cfg: TrainConfig, model: Any, args: Any, tokenizer: Any,
                       train_recs: list[ChatSample], eval_recs: list[ChatSample],
                       callbacks: list[Any]) -> Any:
    from datasets import Dataset

    data = {"train_dataset": Dataset.from_list([pref_row(r) for r in train_recs]),
            "eval_dataset": Dataset.from_list([pref_row(r) for r in eval_recs]) if eval_recs
            else None}
    if cfg.objective == "dpo":
        from trl import DPOTrainer

        # No ref_model: with peft_config trl takes the base with the adapter disabled.
        return DPOTrainer(model, args=args, processing_class=tokenizer,
                          peft_config=lora_config(cfg), callbacks=callbacks, **data)
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer(model, args=args, processing_class=tokenizer, peft_config=lora_config(cfg),
                       callbacks=callbacks, **data)


def _reference_model(trainer: Any, objective: str) -> str | None:
    """How DPO gets its reference: 'adapter_disabled' means no second model in memory."""
    if objective != "dpo":
        return None  # ORPO is reference-free
    return "adapter_disabled" if getattr(trainer, "ref_model", None) is None else "separate_copy"


def reward_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """Last train and eval values of trl's reward metrics, plus the first eval ones (step 0)."""
    out: dict[str, float] = {}
    for key in REWARD_KEYS:
        for name in (key, f"eval_{key}"):
            value = last(history, name)
            if value is not None:
                out[name] = value
        first = [h[f"eval_{key}"] for h in history if f"eval_{key}" in h]
        if first:
            out[f"eval_{key}_initial"] = float(first[0])
    return out
