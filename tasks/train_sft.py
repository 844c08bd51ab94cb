"""The SFT recipe of the train stage: (Q)LoRA supervised fine-tuning with trl's SFTTrainer on the
previous stage's chat or text records.

One kind of record trains: chat when there are chats (a preference pair counts as its prompt and
chosen reply), else text. On chats the loss covers only the assistant's turns when the chat
template can mark them.
"""

from __future__ import annotations

import logging
from typing import Any

from data_contracts.config import TrainConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.chat_templates import encode, training_template
from tasks.train_common import TrainJob, TrainRun, keep_usable, read_splits
from tasks.train_model import lora_config

log = logging.getLogger(__name__)


def train_sft(job: TrainJob) -> Manifest:
    """Fine-tune the base model with (Q)LoRA on the input's chat or text records."""
    from datasets import Dataset
    from trl import SFTTrainer

    cfg = job.cfg
    run = TrainRun(job)  # base model, tokenizer and chat template, this process's rank
    template, mask_problem = training_template(run.tokenizer)

    splits = read_splits(job.input_path)
    # Chat records win: a text record in a chat run has no assistant turn to learn from.
    kind = "chat" if any(sft_kind(r) == "chat" for r in splits["train"]) else "text"
    # Assistant-only loss only makes sense on chat records with a template that can mask.
    assistant_only = cfg.assistant_only_loss and kind == "chat" and mask_problem is None

    def reject(rec: ChatSample) -> tuple[str, dict[str, Any]] | None:
        if sft_kind(rec) != kind:
            return f"{rec.kind}_in_{kind}_run", {}
        if assistant_only and not _assistant_in_window(rec, run.tokenizer, cfg.max_length,
                                                       template):
            # trl would silently drop it: the prompt alone fills max_length.
            return "no_assistant_tokens_within_max_length", {"max_length": cfg.max_length}
        return None

    train_recs, eval_recs = keep_usable(splits, run.writer, reject)
    if not train_recs:
        raise ValueError(f"{job.input_path}: no usable training records (kind {kind})")
    if cfg.assistant_only_loss and kind == "chat" and mask_problem:
        log.warning("training on whole conversations, not only assistant turns: %s",
                    mask_problem)

    run.load_model()
    rows, has_eval = [sft_row(r) for r in train_recs], bool(eval_recs)
    run.trainer = SFTTrainer(
        run.model, args=_sft_config(cfg, run.trainer_args(has_eval), assistant_only),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list([sft_row(r) for r in eval_recs]) if has_eval else None,
        processing_class=run.tokenizer, peft_config=lora_config(cfg),
        callbacks=run.callbacks(has_eval),
    )
    # For the round trip check after export.
    expected_ids = _trained_ids(run.trainer, run.tokenizer, rows[0],
                                getattr(run.trainer, "chat_template", None), cfg.packing)
    return run.train_and_finish(
        records_in=sum(len(records) for records in splits.values()), has_eval=has_eval,
        check_row=rows[0], expected_ids=expected_ids, logprob_tiles=not run.cuda,
        info={"data_kind": kind, "assistant_only_loss": assistant_only,
              "assistant_mask_problem": mask_problem, "group_by_length": cfg.group_by_length,
              "packing": cfg.packing},
    )


# --- records -------------------------------------------------------------------------------

def sft_kind(rec: ChatSample) -> str:
    """SFT sees a preference pair as the chat prompt + chosen reply."""
    return "chat" if rec.kind == "preference" else rec.kind


def sft_row(rec: ChatSample) -> dict[str, Any]:
    """A record in trl's form: conversational (messages) or plain text."""
    if rec.messages:
        return {"messages": [m.model_dump() for m in rec.conversation()]}
    return {"text": rec.text}


def _assistant_in_window(rec: ChatSample, tokenizer: Any, max_length: int,
                         template: str | None) -> bool:
    out = tokenizer.apply_chat_template(
        sft_row(rec)["messages"], tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, chat_template=template,
    )
    return any(out["assistant_masks"][:max_length])


# --- trainer -------------------------------------------------------------------------------

def _sft_config(cfg: TrainConfig, common: dict[str, Any], assistant_only: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        **common, packing=cfg.packing, assistant_only_loss=assistant_only,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        ddp_find_unused_parameters=False,  # LoRA uses every adapter: no extra pass per step
    )


def _trained_ids(trainer: Any, tokenizer: Any, row: dict[str, Any], template: str | None,
                 packing: bool) -> list[int]:
    """The ids training saw for the first train row: trl's tokenized row itself, unless packing
    merged rows, then trl's rendering of it (the training template, which trl may have patched)."""
    if not packing:
        return list(trainer.train_dataset[0]["input_ids"])
    return encode(tokenizer, row, template)
