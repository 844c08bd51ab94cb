"""Test helpers shared by the augment/evaluate/export tests: chat data and a trained train dir.

The train dir mimics what tasks/train.py writes (adapter/, merged/, manifest.json) without
importing it: a peft LoRA on the tiny base, trained with a plain torch loop, then merged.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, Message, content_id
from tasks.io import StageWriter

TOPICS = [
    ("reset my password", "Open the account settings page, choose security and press reset."),
    ("track my order", "Your order has shipped and should arrive within three business days."),
    ("cancel my subscription", "Go to billing, pick the plan and press cancel to stop renewal."),
    ("update my address", "Open your profile, edit the shipping address and save the change."),
    ("get a refund", "Refunds go back to the original card within five business days."),
    ("change my email", "Open the account settings page, edit the email and confirm the link."),
]
OPENERS = ["How do I", "Can you help me", "Please tell me how to", "What is the way to"]
THANKS = ["", " Let me know if you need anything else.", " Thanks for reaching out to support."]


def support_chats(n: int, seed: int = 0, prefix: str = "c") -> list[ChatSample]:
    """n small, regular support conversations (a model can learn them in a few dozen steps)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic, answer = TOPICS[rng.randrange(len(TOPICS))]
        question = f"{rng.choice(OPENERS)} {topic}?"
        msgs = [Message(role="user", content=question),
                Message(role="assistant", content=answer + rng.choice(THANKS))]
        out.append(ChatSample(id=f"{prefix}{i}-{content_id(None, question + str(i))[:6]}",
                              messages=msgs))
    return out


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core box OpenMP's spin-waits make
    every op ~10x slower: run them single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_stage_dir(out_dir: Path, train: list[ChatSample],
                    heldout: list[ChatSample] | tuple = ()) -> Path:
    """A finished stage dir (as dedup would write it) holding these train and heldout records."""
    writer = StageWriter(out_dir, "dedup")
    for rec in train:
        writer.keep(rec, split="train")
    for rec in heldout:
        writer.keep(rec, split="eval")
    writer.finish(len(train) + len(heldout), input_digests={}, config_digest="fixture")
    return out_dir


def build_train_dir(out_dir: Path, home: Path, steps: int = 30, lr: float = 3e-3) -> Path:
    """A train dir like tasks/train.py's: LoRA adapter + merged model + manifest (cached)."""
    if (out_dir / "manifest.json").exists():
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.base_model import resolve_base_model

    base = resolve_base_model("builtin:tiny-llama", home)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    texts = [tok.apply_chat_template([m.model_dump() for m in r.messages], tokenize=False)
             for r in support_chats(64, seed=1)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    model.train()
    history = []
    with one_torch_thread():
        for step in range(steps):
            batch = [texts[(step * 8 + j) % len(texts)] for j in range(8)]
            enc = tok(batch, return_tensors="pt", padding=True)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            history.append(f'{{"step": {step + 1}, "loss": {loss.item():.4f}}}')
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "adapter")
    tok.save_pretrained(out_dir / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir / "merged", safe_serialization=True)
    tok.save_pretrained(out_dir / "merged")
    (out_dir / "history.jsonl").write_text("\n".join(history) + "\n")
    Manifest(stage="train", info={
        "adapter_dir": str(out_dir / "adapter"), "merged_dir": str(out_dir / "merged"),
        "base_model": base, "quantized": False, "method": "lora",
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
    }, metrics={"train.final_loss": float(history[-1].split(": ")[-1].rstrip("}"))}).write(out_dir)
    return out_dir
