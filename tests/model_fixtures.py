"""Test helpers shared by the augment/evaluate/export tests: chat data and a trained train dir
(written by the real train stage, so evaluate and export read exactly what it hands over)."""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from data_contracts.records import ChatSample, Message, content_id
from tasks.stage_dir import StageWriter

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


def _chats(n: int, seed: int, prefix: str, topics: list[tuple[str, str]], openers: list[str],
           closings: list[str] | None = None) -> list[ChatSample]:
    """n seeded one-turn chats: an opener and a topic ask, the topic's answer (and one of the
    closing lines, when given) replies."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic, answer = topics[rng.randrange(len(topics))]
        question = f"{rng.choice(openers)} {topic}?"
        msgs = [Message(role="user", content=question),
                Message(role="assistant",
                        content=answer + (rng.choice(closings) if closings else ""))]
        out.append(ChatSample(id=f"{prefix}{i}-{content_id(None, question + str(i))[:6]}",
                              messages=msgs))
    return out


def support_chats(n: int, seed: int = 0, prefix: str = "c") -> list[ChatSample]:
    """n small, regular support conversations (a model can learn them in a few dozen steps)."""
    return _chats(n, seed, prefix, TOPICS, OPENERS, THANKS)


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


def seed_home(home: Path, session_home: Path) -> Path:
    """A new ftflow home holding what the session already built: the language-id model and the
    builtin base (pretrained once per session), so that a test about something else does not
    pretrain the base again (~40 CPU-seconds each). Returns ``home``."""
    import shutil

    from tasks.assets import ensure_lid_model
    from tasks.base_model import resolve_base_model

    ensure_lid_model(session_home)
    with one_torch_thread():
        base = Path(resolve_base_model("builtin:tiny-llama", session_home))
    shutil.copytree(session_home / "assets", home / "assets", dirs_exist_ok=True)
    shutil.copytree(base, home / "models" / base.name, dirs_exist_ok=True)
    return home


def write_stage_dir(out_dir: Path, train: list[ChatSample],
                    heldout: list[ChatSample] | tuple = ()) -> Path:
    """A finished stage dir (as dedup would write it) holding these train and heldout records."""
    writer = StageWriter(out_dir, "dedup")
    for rec in train:
        writer.keep(rec, split="train")
    for rec in heldout:
        writer.keep(rec, split="heldout")
    writer.finish(len(train) + len(heldout), input_digests={}, config_digest="fixture")
    return out_dir


def shuffle_replies(chats: list[ChatSample], seed: int = 0) -> list[ChatSample]:
    """The same chats with their final replies permuted across chats (seeded): the replies'
    words and format stay, the link between a question and its reply is gone."""
    replies = [c.messages[-1] for c in chats]
    random.Random(seed).shuffle(replies)
    return [c.model_copy(update={"messages": [*c.messages[:-1], reply]})
            for c, reply in zip(chats, replies)]


def build_train_dir(out_dir: Path, home: Path, steps: int = 30, lr: float = 3e-3,
                    shuffled: bool = False) -> Path:
    """A train stage dir written by the real train stage (tasks/train.py): LoRA on the tiny base
    over small support chats (their replies shuffled across chats when asked); cached, since
    the stage skips itself when it is up to date."""
    from data_contracts.config import TrainConfig
    from tasks.train import run_train

    chats = support_chats(64, seed=1)
    data = write_stage_dir(out_dir.parent / f"{out_dir.name}-data",
                           shuffle_replies(chats) if shuffled else chats,
                           support_chats(8, seed=2, prefix="h"))
    cfg = TrainConfig(method="lora", max_steps=steps, learning_rate=lr, batch_size=8,
                      warmup_ratio=0.0, eval_steps=steps, save_steps=steps, logging_steps=5)
    with one_torch_thread():
        run_train(data, out_dir, cfg, home=home, seed=0)
    return out_dir


# Chats whose reply depends on the question alone: one reply per topic, each in its own words,
# no shared template and no closing-line variants, so the reply-choice task's distractors
# (other held-out chats' replies) are always other topics' replies.
REPLY_TOPICS = [
    ("reset my password", "Press forgot password on the login screen and follow the emailed link."),
    ("download an invoice", "Every invoice sits under billing history as a printable PDF."),
    ("get a refund", "Refunds reach the original card within five business days."),
    ("change the delivery date", "Couriers can rebook delivery for any weekday from the tracking page."),
    ("use a coupon", "Type the coupon code at checkout before paying; one code per order."),
    ("close my account", "Closing an account erases saved data after a thirty day grace period."),
    ("update my address", "Edit the address in your profile; parcels already shipped keep the old one."),
    ("cancel my subscription", "Cancel the subscription from the plans tab; it stops at renewal."),
    ("claim the warranty", "Warranty claims need the serial number and a photo of the fault."),
    ("send a gift card", "Gift cards are emailed instantly and never expire."),
    ("stop the newsletter", "Unsubscribe from the newsletter with the link at the bottom of any issue."),
    ("replace the battery", "Batteries are swapped free at any repair shop while under cover."),
]
TOPIC_OPENERS = [*OPENERS, "I need to", "Explain how to"]
PRIME_STEPS, TOPIC_STEPS, TOPIC_LR = 150, 60, 1e-2  # measured: BENCHMARKS.md, "A gate that fails"


def topic_chats(n: int, seed: int = 0, prefix: str = "t") -> list[ChatSample]:
    """n support chats over REPLY_TOPICS: which reply answers is decided by the question."""
    return _chats(n, seed, prefix, REPLY_TOPICS, TOPIC_OPENERS)


def worded_base(out_dir: Path, home: Path, steps: int = PRIME_STEPS) -> Path:
    """The tests' builtin base, trained further (every weight, plain loop, lr 1e-3) on the
    questions and the replies of topic_chats as separate texts: a base that knows the words of
    the domain, as a real base knows its language, and not which reply answers which question.
    The train stage's LoRA cannot teach the test-budget base the words: trl computes the loss
    from lm_head.weight (no adapter there), and all-linear LoRA on that base stays near 6 nats
    a reply token after 150 steps, learning neither the replies nor their link to a question."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.base_model import resolve_base_model

    if (out_dir / "model.safetensors").exists():
        return out_dir
    base = Path(resolve_base_model("builtin:tiny-llama", home))
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    chats = topic_chats(64, seed=1)
    texts = sorted({c.messages[0].content for c in chats}) + [a for _, a in REPLY_TOPICS]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(steps):
        batch = rng.sample(rows, 8)
        width = max(len(r) for r in batch)
        ids = torch.zeros((8, width), dtype=torch.long)
        labels = torch.full((8, width), -100)
        mask = torch.zeros((8, width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, :len(row)], labels[i, :len(row)] = torch.tensor(row), torch.tensor(row)
            mask[i, :len(row)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    for name in base.iterdir():  # the tokenizer and its chat template
        if name.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(name, out_dir)
    return out_dir


def build_topic_train_dir(out_dir: Path, base: Path, home: Path, shuffled: bool = False,
                          seed: int = 0) -> Path:
    """The real train stage (LoRA, TOPIC_STEPS steps) on topic_chats over ``base`` (see
    worded_base), the replies shuffled across chats (seeded) when asked."""
    from data_contracts.config import TrainConfig
    from tasks.train import run_train

    chats = topic_chats(64, seed=1)
    data = write_stage_dir(out_dir.parent / f"{out_dir.name}-data",
                           shuffle_replies(chats, seed) if shuffled else chats,
                           topic_chats(4, seed=2, prefix="h"))
    cfg = TrainConfig(base_model=str(base), method="lora", max_steps=TOPIC_STEPS,
                      learning_rate=TOPIC_LR, batch_size=8, warmup_ratio=0.0,
                      eval_steps=TOPIC_STEPS, save_steps=TOPIC_STEPS, logging_steps=10)
    with one_torch_thread():
        run_train(data, out_dir, cfg, home=home, seed=seed)
    return out_dir


def train_dir_with_model(root: Path, train_dir: Path, model: Any) -> Path:
    """A train manifest like train_dir's whose merged model is ``model`` (saved under root,
    with train_dir's tokenizer)."""
    import shutil

    from data_contracts.manifest import Manifest

    info = {**Manifest.read(train_dir).info}
    model.save_pretrained(root / "merged")
    for tokenizer_file in Path(info["merged_dir"]).glob("*"):
        if tokenizer_file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(tokenizer_file, root / "merged")
    info["merged_dir"] = str(root / "merged")
    Manifest(stage="train", info=info).write(root)
    return root


def damaged_train_dir(root: Path, train_dir: Path) -> Path:
    """The tuned model of train_dir with its weights damaged (seeded noise at 3x each matrix's
    spread), as a broken merge or quantization would leave it; a train manifest pointing to it."""
    import torch
    from transformers import AutoModelForCausalLM

    from data_contracts.manifest import Manifest

    model = AutoModelForCausalLM.from_pretrained(Manifest.read(train_dir).info["merged_dir"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.add_(torch.randn(weight.shape, generator=gen) * 3.0 * weight.std())
    return train_dir_with_model(root, train_dir, model)
