"""Stage 5: QLoRA (or plain LoRA) fine-tuning, SFT or, with train.objective dpo or orpo, on
preference pairs.

Reads the train split (``data-*``) and the held-out split (``heldout-*``) of the previous stage,
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
from tasks.io import input_digests
from tasks.train_common import TrainJob, already_trained
from tasks.train_pref import train_pref
from tasks.train_sft import train_sft
from tasks.wrap import prefect_task


def run_train(input_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
              home: str | Path, seed: int = 42) -> Manifest:
    """Fine-tune the base model with (Q)LoRA on the input's chat or text records; with
    train.objective dpo or orpo, on its preference pairs instead."""
    digests = input_digests(input_path)
    cdig = cfg.digest()
    out = Path(out_dir)
    if already_trained(out, digests, cdig):
        return Manifest.read(out)
    job = TrainJob(input_path, out, cfg, home, seed, digests, cdig)
    return train_sft(job) if cfg.objective == "sft" else train_pref(job)


# The Prefect task (tasks/wrap.py): `from tasks.train import train_task`, built on first use.
__getattr__ = prefect_task("train_task", run_train, globals(),
                           name="train", retries=1, retry_delay_seconds=[10], tags=["ftflow"])
