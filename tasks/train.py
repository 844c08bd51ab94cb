"""Stage 5: QLoRA (or plain LoRA) fine-tuning, SFT or, with train.objective dpo or orpo, on
preference pairs.

Reads the train split (``train-*``) and the held-out split (``heldout-*``) of the previous stage,
trains a LoRA adapter on a 4-bit NF4 base (bitsandbytes; on CPU too), resumes from the last
checkpoint after a crash, and writes ``adapter/`` and a full-precision ``merged/`` model, both
safetensors with the chat template, plus ``history.jsonl`` (the trainer's log) for MLflow.
The recipes are tasks/train_sft.py and tasks/train_pref.py; what they share is in
tasks/train_common.py.
"""

from __future__ import annotations

from pathlib import Path

from data_contracts.config import TrainConfig
from data_contracts.manifest import Manifest
from tasks.base_model import check_safetensors, resolve_base_model
from tasks.stage_dir import StageDir
from tasks.train_common import STAGE, TrainJob
from tasks.train_pref import train_pref
from tasks.train_sft import train_sft


def run_train(input_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
              home: str | Path, seed: int = 42) -> Manifest:
    """Fine-tune the base model with (Q)LoRA on the input's chat or text records; with
    train.objective dpo or orpo, on its preference pairs instead."""
    # The manifest lists adapter/, merged/ and history with their digests: a crash in the
    # merge, or a model file changed since, is never "up to date".
    # Before anything is loaded: a pickle-only base is refused in seconds, not after torch.
    check_safetensors(resolve_base_model(cfg.base_model, home), cfg.allow_pickle)
    stage = StageDir(out_dir, STAGE, cfg.digest(), input_path)
    if (done := stage.finished()) is not None:
        return done
    job = TrainJob(input_path, Path(out_dir), cfg, home, seed, stage)
    return train_sft(job) if cfg.objective == "sft" else train_pref(job)
