"""Stage 5 on preference pairs: DPO and ORPO through trl with QLoRA on the tiny model, on CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from data_contracts.config import LoraConfig, TrainConfig
from data_contracts.records import ChatSample, Message
from model_fixtures import write_stage_dir
from tasks.io import read_records
from tasks.chat_templates import check_round_trip
from tasks.train import run_train
from tasks.stage_dir import StageDir
from tasks.train_common import TrainJob
from tasks.train_pref import train_pref

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Support questions; the preferred reply is always in one polite form, the rejected one is rude.
TOPICS = [
    ("reset my password", "Open Settings, choose Security and press Reset."),
    ("track my order", "Open Orders and press Track next to the parcel."),
    ("cancel my plan", "Open Billing, pick the plan and press Cancel."),
    ("update my address", "Open Profile, edit the address and press Save."),
    ("get a refund", "Open Orders, pick the item and press Refund."),
    ("change my email", "Open Settings, edit the email and confirm the link."),
    # Held out: questions and answers the training pairs never contain.
    ("download my invoice", "Open Billing and press Download next to the invoice."),
    ("delete my account", "Open Settings, choose Privacy and press Delete."),
]
RUDE = ["Not my problem.", "Figure it out yourself.", "Stop bothering me.",
        "No. Read the manual."]
MAX_LENGTH = 96


def _pair(i: int, topic: int) -> ChatSample:
    question, answer = TOPICS[topic]
    return ChatSample(
        id=f"p{i}", messages=[Message(role="user", content=f"How do I {question}? Ticket {100 + i}.")],
        chosen=f"Happy to help! {answer} Have a great day.", rejected=RUDE[i % len(RUDE)])


def _long_prompt_pair() -> ChatSample:
    story = " ".join(f"Yesterday my order number {n} arrived late again." for n in range(40))
    return ChatSample(id="long", messages=[Message(role="user", content=story)],
                      chosen="Happy to help! Have a great day.", rejected="Not my problem.")


def _chat(i: int) -> ChatSample:
    return ChatSample(id=f"c{i}", messages=[Message(role="user", content="Hi there."),
                                            Message(role="assistant", content="Hello!")])


def _cfg(**overrides: object) -> TrainConfig:
    base = dict(objective="dpo", max_steps=10, batch_size=8, max_length=MAX_LENGTH,
                learning_rate=5e-3, eval_steps=5, save_steps=5, logging_steps=2,
                lora=LoraConfig(r=8, alpha=16))
    return TrainConfig(**{**base, **overrides})


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _reply_logp(model: torch.nn.Module, tok: object, rec: ChatSample, reply: str) -> float:
    """log p(reply | prompt) under the chat template, summed over the reply's tokens."""
    prompt = [m.model_dump() for m in rec.messages]
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}],
                                   tokenize=True, return_dict=True)["input_ids"]
    assert full[:len(head)] == head
    ids = torch.tensor([full])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logps.gather(1, targets[:, None])[:, 0]
    return float(picked[len(head) - 1:].sum())


def _margins(model_dir: str, pairs: list[ChatSample]) -> list[float]:
    """Per pair: log p(chosen) - log p(rejected), with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [_reply_logp(model, tok, r, r.chosen) - _reply_logp(model, tok, r, r.rejected)
            for r in pairs]


@pytest.fixture(scope="module")
def dpo_run(session_home: Path, tmp_path_factory: pytest.TempPathFactory, torch_one_thread):
    tmp = tmp_path_factory.mktemp("dpo")
    train = [_pair(i, i % 6) for i in range(32)] + [
        _chat(0), ChatSample(id="t0", text="A support article."), _long_prompt_pair()]
    heldout = [_pair(100 + i, 6 + i % 2) for i in range(8)] + [_chat(1)]
    src = write_stage_dir(tmp / "in", train, heldout)
    out = tmp / "out"
    # Without activation checkpointing (the ORPO and gradient tests keep it): ~25% faster here.
    cfg = _cfg(gradient_checkpointing=False)
    return run_train(src, out, cfg, home=session_home), src, out


def test_dpo_learns_to_prefer_the_chosen_form(dpo_run):
    manifest, src, out = dpo_run
    history = _history(out)
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    # Step 0: policy == reference, so every reward is 0 and no pair is "won" yet.
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/margins"] == 0.0
    assert evals[-1]["step"] == 10
    assert evals[-1]["eval_rewards/accuracies"] == 1.0
    assert evals[-1]["eval_rewards/margins"] > 1.0
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2)) and evals[-1]["eval_loss"] < 0.3
    train_logs = [h for h in history if "rewards/accuracies" in h]
    assert train_logs[0]["rewards/accuracies"] < 0.5 and train_logs[-1]["rewards/accuracies"] == 1.0
    assert train_logs[-1]["rewards/chosen"] > 0 > train_logs[-1]["rewards/rejected"]
    m = manifest.metrics
    assert m["eval_rewards/accuracies"] == 1.0 and m["eval_rewards/accuracies_initial"] == 0.0
    assert m["eval_rewards/margins"] == pytest.approx(evals[-1]["eval_rewards/margins"])
    # Independent of trl: on held-out questions the exported model prefers the polite form far
    # more than the base did, pair by pair.
    pairs = [r for r in read_records(src, "heldout") if r.kind == "preference"]
    before = _margins(manifest.info["base_model"], pairs)
    after = _margins(manifest.info["merged_dir"], pairs)
    gains = [a - b for a, b in zip(after, before)]
    assert min(gains) > 10.0, (before, after)
    # trl's held-out reward margin is beta times this gain (measured on the 4-bit base there).
    assert m["eval_rewards/margins"] == pytest.approx(0.1 * sum(gains) / len(gains), rel=0.1)


def test_dpo_ran_on_4bit_with_the_base_as_reference(dpo_run):
    manifest, _, _ = dpo_run
    info = manifest.info
    assert info["objective"] == "dpo" and info["beta"] == 0.1
    assert info["reference_model"] == "adapter_disabled"  # no second model copy
    assert info["quantized"] is True and info["fallback_reason"] is None
    assert info["linear4bit_modules"] == 4 * 7
    assert 0 < manifest.metrics["trainable_share"] < 0.2
    assert manifest.metrics["steps"] == 10 and manifest.metrics["train_tokens"] > 0


def test_ledger_keeps_pairs_and_names_every_drop(dpo_run):
    manifest, _, out = dpo_run
    manifest.check()
    assert manifest.records_in == 35 + 9
    assert manifest.filtered == {"chat_in_preference_run": 2, "text_in_preference_run": 1,
                                 "prompt_fills_max_length": 1}
    assert manifest.splits == {"train": 32, "heldout": 8}
    assert {r.id for r in read_records(out, "train")} == {f"p{i}" for i in range(32)}
    assert all(r.kind == "preference" for r in read_records(out, "heldout"))
    import gzip

    with gzip.open(out / "filtered.jsonl.gz", "rt") as fh:
        long = next(json.loads(line) for line in fh if '"long"' in line)
    assert long["reason"] == "prompt_fills_max_length" and long["prompt_tokens"] >= MAX_LENGTH


def test_adapter_and_merged_carry_the_chat_template(dpo_run):
    from transformers import AutoTokenizer

    manifest, _, out = dpo_run
    adapter, merged = Path(manifest.info["adapter_dir"]), Path(manifest.info["merged_dir"])
    assert (adapter / "adapter_model.safetensors").exists()
    assert (merged / "model.safetensors").exists() and not list(merged.glob("*.bin"))
    base_tok = AutoTokenizer.from_pretrained(manifest.info["base_model"])
    for folder in (adapter, merged):
        assert AutoTokenizer.from_pretrained(folder).chat_template == base_tok.chat_template
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-5"]


def test_unchanged_rerun_is_skipped(dpo_run, session_home: Path):
    manifest, src, out = dpo_run
    again = run_train(src, out, _cfg(gradient_checkpointing=False), home=session_home)
    assert again.started_at == manifest.started_at


def test_orpo_trains_saves_and_resumes(session_home: Path, tmp_path: Path):
    train = [_pair(i, i % 6) for i in range(16)]
    src = write_stage_dir(tmp_path / "in", train, [_pair(100, 6), _pair(101, 7)])
    out = tmp_path / "out"
    cfg = _cfg(objective="orpo", max_steps=4, batch_size=4, save_steps=2, eval_steps=4)
    m = run_train(src, out, cfg, home=session_home)
    assert m.info["objective"] == "orpo" and m.info["reference_model"] is None
    assert m.info["quantized"] is True
    losses = [h["loss"] for h in _history(out) if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert math.isfinite(m.metrics["eval_loss"]) and "eval_rewards/accuracies" in m.metrics
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    row = {"messages": [x.model_dump() for x in train[0].conversation()]}
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(m.info["base_model"]).apply_chat_template(
        row["messages"], tokenize=True, return_dict=True)["input_ids"]
    check_round_trip(out / "merged", row, list(expected), TrainConfig())

    # Killed after the step-4 checkpoint: a longer rerun continues from it.
    for name in ("manifest.json", "adapter", "merged"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    resumed = run_train(src, out, cfg.model_copy(update={"max_steps": 6}),
                        home=session_home)
    assert resumed.info["resumed_from_step"] == 4 and resumed.metrics["steps_run"] == 2
    assert (out / "merged" / "model.safetensors").exists()


def _dpo_loss(model: torch.nn.Module, batch: dict, beta: float) -> torch.Tensor:
    """The sigmoid DPO loss written out, with the adapter-disabled model as reference."""
    def logps() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1].float()
        per_token = torch.log_softmax(logits, -1).gather(2, batch["input_ids"][:, 1:, None])
        return (per_token[..., 0] * batch["completion_mask"][:, 1:]).sum(1)

    policy = logps()
    with torch.no_grad(), model.disable_adapter():
        ref = logps()
    chosen, rejected = (policy - ref).chunk(2)
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()


def test_4bit_gradients_after_evaluations_match_a_dequantized_copy(session_home: Path,
                                                                    tmp_path: Path):
    """DPO's reference and eval passes run without grad: on CPU bitsandbytes must not repack
    the 4-bit weights then, or every later backward pass through them goes wrong."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig as PeftLoraConfig
    from peft import (get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training,
                      set_peft_model_state_dict)
    from transformers import AutoModelForCausalLM

    from tasks.base_model import resolve_base_model
    from tasks.chat_templates import prepare_tokenizer
    from tasks.train_common import trainer_args
    from tasks.train_model import adapter_to_fp32, load_model
    from tasks.train_pref import build_pref_trainer, pref_config

    cfg = _cfg(max_steps=2, eval_steps=1, batch_size=4)
    base = resolve_base_model(cfg.base_model, session_home)
    tokenizer, _ = prepare_tokenizer(base, cfg)
    model, quantized, _ = load_model(base, cfg, cuda=False)
    assert quantized
    # The very same network in fp32: each 4-bit weight dequantized into a plain copy.
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    plain_layers = dict(plain.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            plain_layers[name].weight.data = dequantize_4bit(
                module.weight.data, module.weight.quant_state).float()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    pairs = [_pair(i, i % 6) for i in range(8)]
    args = pref_config(cfg, trainer_args(cfg, tmp_path / "ckpt", False, "adamw_torch", True, 0))
    trainer = build_pref_trainer(cfg, model, args, tokenizer, pairs, pairs[:4], [])
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled
    adapter_to_fp32(trainer.model)
    trainer.train()  # evaluations at steps 0, 1 and 2 around two training steps
    trainer.evaluate()

    policy = trainer.model
    lora = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    reference = get_peft_model(plain, lora)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(policy))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    grads = []
    for net in (policy, reference):
        net.train()
        net.zero_grad()
        _dpo_loss(net, batch, cfg.beta).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    got, want = grads
    assert got.keys() == want.keys() and len(got) == 2 * 4 * 7
    for name, g in want.items():
        assert g.norm() > 0, name
        error = float((got[name] - g).norm() / g.norm())
        assert error <= 0.02, f"{name}: gradient {error:.1%} off the dequantized model's"


def test_the_train_stage_trains_the_configured_objective(session_home: Path, tmp_path: Path):
    # What the pipeline and `ftflow stage train` call: train.objective picks DPO/ORPO there.
    src = write_stage_dir(tmp_path / "in", [_pair(i, i % 6) for i in range(8)])
    m = run_train(src, tmp_path / "out", _cfg(objective="orpo", max_steps=2, batch_size=4,
                                             eval_steps=2), home=session_home)
    assert m.info["objective"] == "orpo" and m.info["data_kind"] == "preference"
    assert "rewards/accuracies" in _history(tmp_path / "out")[0]


def test_sft_objective_is_not_a_preference_run(session_home: Path, tmp_path: Path):
    src = write_stage_dir(tmp_path / "in", [_pair(0, 0)])
    with pytest.raises(ValueError, match="objective"):
        cfg = _cfg(objective="sft")
        stage = StageDir(tmp_path / "out", "train", cfg.digest(), src)
        train_pref(TrainJob(src, tmp_path / "out", cfg, session_home, 42, stage))
