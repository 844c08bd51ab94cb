"""Stage 5: QLoRA training on the tiny builtin model, on CPU, through the real libraries."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from data_contracts.config import LoraConfig, TrainConfig
from data_contracts.records import ChatSample, Message
from tasks.io import read_records
from tasks.stage_dir import StageWriter
from tasks.chat_templates import NAMED_TEMPLATES, check_round_trip
from tasks.train import run_train
from tasks.train_model import load_model

TOPICS = ["password", "invoice", "refund", "delivery", "coupon", "account"]


def _chat(i: int) -> ChatSample:
    topic = TOPICS[i % len(TOPICS)]
    return ChatSample(id=f"c{i}", messages=[
        Message(role="user", content=f"Help me with my {topic}, ticket {100 + i}."),
        Message(role="assistant", content=f"Sure: open Settings, choose {topic}, then save."),
    ])


def _multi_turn() -> ChatSample:
    """A system prompt and two exchanges: the masks must pick out both replies and nothing else."""
    return ChatSample(id="m0", messages=[
        Message(role="system", content="You are a support agent."),
        Message(role="user", content="Help me with my invoice, ticket 7."),
        Message(role="assistant", content="Sure: open Billing, choose invoice, then save."),
        Message(role="user", content="And my refund?"),
        Message(role="assistant", content="Open Orders and press Refund."),
    ])


def _pair(i: int) -> ChatSample:
    topic = TOPICS[i % len(TOPICS)]
    return ChatSample(id=f"p{i}", messages=[Message(role="user", content=f"Help with my {topic}.")],
                      chosen=f"Sure: open Settings, choose {topic}, then save.",
                      rejected="Not my problem.")


def _text(i: int) -> ChatSample:
    return ChatSample(id=f"t{i}", text=f"Support article {i}: how to reset a password safely.")


def _stage_dir(path: Path, train: list[ChatSample], heldout: list[ChatSample]) -> Path:
    """An upstream stage directory written by the real StageWriter."""
    writer = StageWriter(path, "dedup")
    for rec in train:
        writer.keep(rec, "train")
    for rec in heldout:
        writer.keep(rec, "heldout")
    writer.finish(len(train) + len(heldout), input_digests={}, config_digest="test")
    return path


def _fast_cfg(**overrides: object) -> TrainConfig:
    base = dict(max_steps=16, batch_size=4, max_length=128, learning_rate=3e-3,
                eval_steps=8, save_steps=8, logging_steps=2, lora=LoraConfig(r=8, alpha=16))
    return TrainConfig(**{**base, **overrides})


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _assistant_loss(model_dir: str, records: list[ChatSample]) -> float:
    """Mean loss of a plain transformers model on the assistant tokens of the records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for rec in records:
            enc = tok.apply_chat_template([m.model_dump() for m in rec.messages], tokenize=True,
                                          return_dict=True, return_assistant_tokens_mask=True)
            ids = torch.tensor([enc["input_ids"]])
            labels = ids.masked_fill(torch.tensor([enc["assistant_masks"]]) == 0, -100)
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def qlora_run(session_home: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("train")
    train = [_chat(i) for i in range(24)] + [_text(0)]
    heldout = [_chat(i) for i in range(100, 106)] + [_text(1)]
    src = _stage_dir(tmp / "in", train, heldout)
    out = tmp / "out"
    manifest = run_train(src, out, _fast_cfg(), home=session_home)
    return manifest, src, out


def test_qlora_really_quantizes_and_learns(qlora_run):
    manifest, src, out = qlora_run
    info = manifest.info
    assert info["quantized"] is True and info["method"] == "qlora"
    assert info["fallback_reason"] is None
    assert info["linear4bit_modules"] == 4 * 7  # every linear of the 4 blocks ran in 4 bits
    assert info["assistant_only_loss"] is True and info["data_kind"] == "chat"
    history = _history(out)
    evals = [h for h in history if "eval_loss" in h]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 16
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    assert manifest.metrics["eval_loss_initial"] == pytest.approx(evals[0]["eval_loss"])
    train_losses = [h["loss"] for h in history if "loss" in h]
    assert train_losses[-1] < train_losses[0]
    # Independent of the trainer: the exported model fits the training records much better.
    records = list(read_records(src, "train"))[:12]
    records = [r for r in records if r.kind == "chat"]
    before = _assistant_loss(info["base_model"], records)
    after = _assistant_loss(info["merged_dir"], records)
    assert after < before - 1.0, (before, after)
    m = manifest.metrics
    assert m["steps"] == 16 and m["steps_run"] == 16
    assert 0 < m["trainable_share"] < 0.2 and m["trainable_params"] > 0
    assert m["train_tokens_per_s"] > 0 and m["peak_rss_mb"] > 0


def test_adapter_and_merged_load_with_plain_libraries(qlora_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest, _, out = qlora_run
    adapter, merged = Path(manifest.info["adapter_dir"]), Path(manifest.info["merged_dir"])
    assert (adapter / "adapter_model.safetensors").exists()
    assert (merged / "model.safetensors").exists()
    assert not list(merged.glob("*.bin")) and not list(adapter.glob("*.bin"))

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with_adapter = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Help me with my refund."}],
                                     add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")
    with torch.no_grad():
        merged_logits = model(**prompt).logits
        adapter_logits = with_adapter(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    # Merging folded the adapter in: same function as base + adapter.
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-3)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_saved_chat_template_is_the_training_one(qlora_run):
    from transformers import AutoTokenizer

    manifest, src, _ = qlora_run
    base_tok = AutoTokenizer.from_pretrained(manifest.info["base_model"])
    assert "{% generation %}" in base_tok.chat_template
    for folder in (manifest.info["adapter_dir"], manifest.info["merged_dir"]):
        assert AutoTokenizer.from_pretrained(folder).chat_template == base_tok.chat_template
    assert manifest.info["chat_template"] == "tokenizer"
    # The round-trip check is live: a sample that encodes differently is an error.
    row = {"messages": [m.model_dump() for m in _chat(0).messages]}
    expected = base_tok.apply_chat_template(row["messages"], tokenize=True,
                                            return_dict=True)["input_ids"]
    check_round_trip(Path(manifest.info["merged_dir"]), row, list(expected), TrainConfig())
    with pytest.raises(RuntimeError, match="round trip"):
        check_round_trip(Path(manifest.info["merged_dir"]), row, list(expected)[:-1] + [7],
                          TrainConfig())


def test_ledger_adds_up_and_text_records_are_accounted_for(qlora_run):
    manifest, _, out = qlora_run
    manifest.check()
    assert manifest.records_in == 24 + 1 + 6 + 1
    assert manifest.filtered == {"text_in_chat_run": 2}
    assert manifest.splits == {"train": 24, "heldout": 6}
    assert {r.id for r in read_records(out, "train")} == {f"c{i}" for i in range(24)}
    assert {r.id for r in read_records(out, "heldout")} == {f"c{i}" for i in range(100, 106)}
    history = _history(out)
    assert any({"loss", "learning_rate", "grad_norm"} <= set(h) for h in history)
    assert manifest.info["history_file"] == str(out / "history.jsonl")


def test_unchanged_rerun_is_skipped(qlora_run, session_home: Path):
    manifest, src, out = qlora_run
    again = run_train(src, out, _fast_cfg(), home=session_home)
    assert again.started_at == manifest.started_at and again.metrics == manifest.metrics


def test_resume_continues_from_the_last_checkpoint(session_home: Path, tmp_path: Path):
    src = _stage_dir(tmp_path / "in", [_chat(i) for i in range(16)], [])
    out = tmp_path / "out"
    first = run_train(src, out, _fast_cfg(max_steps=4, save_steps=2), home=session_home)
    assert first.info["quantized"] is True and "eval_loss" not in first.metrics
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    # A run killed after its checkpoint at step 4: no manifest, no exported model.
    for name in ("manifest.json", "adapter", "merged"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    resumed = run_train(src, out, _fast_cfg(max_steps=6, save_steps=2), home=session_home)
    assert resumed.info["resumed_from_step"] == 4
    assert resumed.metrics["steps_run"] == 2 and resumed.metrics["steps"] == 6
    steps = [h["step"] for h in _history(out) if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert (out / "merged" / "model.safetensors").exists()

    # Plain LoRA is another job: the QLoRA checkpoints are not reused.
    other = run_train(src, out, _fast_cfg(method="lora", max_steps=2), home=session_home)
    assert other.info["resumed_from_step"] == 0 and other.metrics["steps_run"] == 2
    assert other.info["quantized"] is False and other.info["fallback_reason"] is None
    assert other.info["linear4bit_modules"] == 0 and other.info["optimizer"] == "adamw_torch"


def test_text_only_input_trains_on_text(session_home: Path, tmp_path: Path):
    src = _stage_dir(tmp_path / "in", [_text(i) for i in range(8)], [_text(99)])
    m = run_train(src, tmp_path / "out", _fast_cfg(method="lora", max_steps=2),
                  home=session_home)
    assert m.info["data_kind"] == "text" and m.info["assistant_only_loss"] is False
    assert m.splits == {"train": 8, "heldout": 1} and m.filtered == {}
    assert "eval_loss" in m.metrics


def test_4bit_layers_still_backpropagate_after_an_evaluation(session_home: Path):
    """bitsandbytes 0.50 on CPU repacks 4-bit weights at eval time unless we stop it."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from tasks.base_model import resolve_base_model

    base = resolve_base_model("builtin:tiny-llama", session_home)
    model, quantized, _ = load_model(base, TrainConfig(), cuda=False)
    assert quantized
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.ones((1, 4), dtype=torch.long))  # an evaluation pass
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert x.grad is not None
    assert torch.allclose(x.grad[0], weight.sum(0), atol=1e-3)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produced."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_cpu_logprob_tiles_keep_trls_loss_and_gradients_in_smaller_tiles(session_home: Path):
    """SFT's loss is trl's fused LM head; on CPU we shrink its tiles and score only labelled
    positions. Same loss, metrics and LoRA gradients as trl's own CPU path, and no tensor of
    trl's 4096-token x 32768-column tile size. Fails too if trl's module globals move."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from tasks.base_model import resolve_base_model
    from tasks.train_steps import CPU_LOGPROB_TOKENS, CPU_LOGPROB_VOCAB, cpu_logprob_tiles

    base = resolve_base_model("builtin:tiny-llama", session_home)
    model, _, _ = load_model(base, TrainConfig(), cuda=False)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, PeftLora(r=8, lora_alpha=16, target_modules="all-linear",
                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (4, 600), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 400:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :250] = -100  # a prompt
    labels[attention == 0] = -100

    def run(tiled: bool, record: bool = False):
        model.zero_grad()
        mode = _LargestTensor()
        with cpu_logprob_tiles(tiled), (mode if record else contextlib.nullcontext()):
            out = model(input_ids=ids, attention_mask=attention, labels=labels,
                        fused_lm_head=True)
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        sums = (float(out.entropy.sum()), int(out.is_top1.sum()), int(out.label_mask.sum()))
        return float(out.loss), sums, grads, mode.largest

    loss, metrics, grads, _ = run(tiled=False)
    tiled_loss, tiled_metrics, tiled_grads, largest = run(tiled=True, record=True)
    assert tiled_loss == pytest.approx(loss, rel=1e-5)
    assert tiled_metrics[0] == pytest.approx(metrics[0], rel=1e-4)
    assert tiled_metrics[1:] == metrics[1:]
    assert grads.keys() == tiled_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(tiled_grads[name], grad, rtol=1e-3, atol=1e-6), name
    # Bounded by the tile (or the model's own activations), not by trl's 4096 x 32768 buffer.
    activations = ids.numel() * model.config.intermediate_size
    assert largest <= max(CPU_LOGPROB_TOKENS * CPU_LOGPROB_VOCAB, activations)
    import trl.kernels.chunked_logprob as kernel

    assert kernel.TOKEN_CHUNK_SIZE == 4096  # restored


def test_packed_sequences_do_not_attend_to_each_other(session_home: Path):
    """train.packing uses trl's padding-free collator: several chats in one row, positions
    restarting at each. The model must see them apart (transformers turns restarting position
    ids into a block-diagonal mask for sdpa), or a packed chat would be conditioned on its
    neighbour."""
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tasks.base_model import resolve_base_model

    base = resolve_base_model("builtin:tiny-llama", session_home)
    tok = AutoTokenizer.from_pretrained(base)
    model, quantized, _ = load_model(base, TrainConfig(), cuda=False)
    assert quantized
    first, second = (tok.apply_chat_template([m.model_dump() for m in _chat(i).messages],
                                             tokenize=True, return_dict=True)["input_ids"]
                     for i in (0, 1))
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
        [{"input_ids": first}, {"input_ids": second}])
    assert batch["input_ids"].shape == (1, len(first) + len(second))  # one packed row
    # use_cache=False as trl's training forward sets it: with a KV cache transformers skips the
    # packed-sequence check (it assumes generation), and the chats would see each other.
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits
        # The control: the same row read as one sequence does let the second see the first.
        joined = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert torch.allclose(packed[0, len(first):], alone[0], atol=1e-4)
    assert not torch.allclose(joined[0, len(first):], alone[0], atol=1e-2)


def test_packing_fills_rows_with_several_chats(session_home: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from tasks.base_model import resolve_base_model

    train = [_chat(i) for i in range(24)]
    src = _stage_dir(tmp_path / "in", train, [_chat(100)])
    steps, batch = 2, 2
    m = run_train(src, tmp_path / "out", _fast_cfg(packing=True, max_steps=steps,
                                                   batch_size=batch, eval_steps=2, save_steps=2),
                  home=session_home).check()
    assert m.info["packing"] is True and m.metrics["steps"] == steps
    tok = AutoTokenizer.from_pretrained(resolve_base_model("builtin:tiny-llama", session_home))
    longest = max(len(tok.apply_chat_template([x.model_dump() for x in r.messages],
                                              tokenize=True)) for r in train)
    # More tokens than `batch` unpacked rows per step could ever hold.
    assert m.metrics["train_tokens"] > steps * batch * longest
    assert (tmp_path / "out/merged/config.json").exists()  # the round trip check passed too


def test_early_stopping_exports_the_best_checkpoint(session_home: Path, tmp_path: Path):
    from safetensors.torch import load_file

    # Held-out replies the training data never says, and a learning rate 10x too high: the eval
    # loss falls to step 2, then rises (8.39, 8.31, 8.37), so patience 1 stops at step 4 and
    # the step-2 checkpoint is the best one.
    odd = [ChatSample(id=f"o{i}", messages=[
        Message(role="user", content=f"Help me with my {TOPICS[i]}, ticket {200 + i}."),
        Message(role="assistant", content="Zebra violin harmonica quantum marmalade."),
    ]) for i in range(4)]
    src = _stage_dir(tmp_path / "in", [_chat(i) for i in range(16)], odd)
    out = tmp_path / "out"
    cfg = _fast_cfg(method="lora", max_steps=12, eval_steps=2, save_steps=100,
                    learning_rate=3e-2, early_stopping_patience=1)
    m = run_train(src, out, cfg, home=session_home)
    assert m.info["early_stopping"] is True and m.info["stopped_early"] is True
    assert m.metrics["steps"] == 4 and m.info["best_step"] == 2
    exported = load_file(out / "adapter" / "adapter_model.safetensors")
    best = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert exported.keys() == best.keys()
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert not all(torch.equal(exported[k], last[k]) for k in last)
    # The reported eval loss is the exported (best) model's: the step-2 evaluation's value.
    evals = [h for h in _history(out) if "eval_loss" in h]
    at_2 = next(h["eval_loss"] for h in evals if h["step"] == 2)
    assert m.metrics["eval_loss"] == pytest.approx(at_2, rel=1e-5)


def test_dora_reaches_the_adapter(session_home: Path, tmp_path: Path):
    from safetensors.torch import load_file

    src = _stage_dir(tmp_path / "in", [_chat(i) for i in range(8)], [])
    out = tmp_path / "out"
    m = run_train(src, out, _fast_cfg(max_steps=2, lora=LoraConfig(r=8, alpha=16, use_dora=True)),
                  home=session_home)
    assert m.info["use_dora"] is True and m.info["quantized"] is True
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 4 * 7  # one per adapted linear
    assert (out / "merged" / "model.safetensors").exists()


def test_history_rows_carry_tokens_per_s_and_peak_memory(qlora_run):
    manifest, _, out = qlora_run
    rows = [h for h in _history(out) if "loss" in h]
    assert len(rows) == 16 // 2  # one row per logging step
    assert all(h["tokens_per_s"] > 0 and h["peak_mem_mb"] > 0 for h in rows)
    m = manifest.metrics
    peaks = [h["peak_mem_mb"] for h in rows]
    # A high-water mark: never falls, holds torch and the model, and the stage's own peak is at
    # least it (2% slack: the kernel's resident-set counters are updated lazily).
    assert peaks == sorted(peaks) and 100 < peaks[-1] <= m["peak_rss_mb"] * 1.02
    # trl's cumulative count; each row's rate is over the tokens of its interval. Together the
    # rates must account for every training token within the run's time, of which evaluations
    # and checkpoint saves (left out of the rates) take only a share.
    tokens = [h["num_tokens"] for h in rows]
    assert tokens[-1] == m["train_tokens"]
    interval_tokens = [b - a for a, b in zip([0, *tokens], tokens)]
    seconds = sum(n / h["tokens_per_s"] for n, h in zip(interval_tokens, rows))
    assert 0.2 * m["train_runtime_s"] < seconds <= m["train_runtime_s"]
    # So the per-step rates agree with the overall one: at least it, at most 5x it.
    assert m["train_tokens_per_s"] <= m["train_tokens"] / seconds < 5 * m["train_tokens_per_s"]
    assert all("tokens_per_s" not in h for h in _history(out) if "eval_loss" in h)


def test_orpo_history_counts_tokens_from_the_batches(session_home: Path, tmp_path: Path):
    """ORPO logs no token count of its own: the callback counts the batches' attention masks."""
    from tasks.train_steps import batch_tokens

    batch = {"prompt_attention_mask": torch.ones(2, 3), "chosen_attention_mask": torch.ones(2, 5),
             "rejected_attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
    assert batch_tokens(batch) == 10 + 7  # chosen and rejected include the prompt
    assert batch_tokens({"attention_mask": torch.tensor([[1, 1, 0]])}) == 2
    src = _stage_dir(tmp_path / "in", [_pair(i) for i in range(8)], [])
    m = run_train(src, tmp_path / "out", _fast_cfg(objective="orpo", max_steps=2, logging_steps=1),
                  home=session_home)
    rows = [h for h in _history(tmp_path / "out") if "loss" in h]
    assert [h["step"] for h in rows] == [1, 2]
    assert all(h["tokens_per_s"] > 0 and h["peak_mem_mb"] > 0 for h in rows)
    # Two steps of four pairs, each pair a chosen and a rejected sequence of over 10 tokens.
    assert m.metrics["train_tokens"] > 2 * 4 * 2 * 10
    assert m.metrics["train_tokens_per_s"] > 0


@pytest.fixture
def sft_trainers(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every SFTTrainer run_train builds, kept for inspecting what training saw."""
    import trl

    built: list = []

    class Recording(trl.SFTTrainer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(trl, "SFTTrainer", Recording)
    return built


def _label_spans(tok: object, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of tokens that carries a label (is in the loss)."""
    spans: list[list[int]] = []
    for i, (token, label) in enumerate(zip(ids, labels)):
        if label == -100:
            continue
        assert label == token
        if i and labels[i - 1] != -100:
            spans[-1].append(token)
        else:
            spans.append([token])
    return [tok.decode(span) for span in spans]


@pytest.mark.parametrize("name", ["chatml", "llama-3", "alpaca"])
def test_named_chat_template_masks_saves_and_round_trips(name: str, session_home: Path,
                                                         tmp_path: Path, sft_trainers: list):
    from transformers import AutoTokenizer

    first = _multi_turn()
    src = _stage_dir(tmp_path / "in", [first] + [_chat(i) for i in range(7)], [])
    # max_length 512: the tiny vocabulary splits llama-3's header tokens into many pieces.
    cfg = _fast_cfg(chat_template=name, max_steps=2, save_steps=100, max_length=512)
    m = run_train(src, tmp_path / "out", cfg, home=session_home)
    assert m.info["chat_template"] == name and m.info["assistant_only_loss"] is True
    template = NAMED_TEMPLATES[name]
    for folder in (m.info["adapter_dir"], m.info["merged_dir"]):
        assert AutoTokenizer.from_pretrained(folder).chat_template == template

    # The loss covers exactly the two replies, each with the turn's end token, nothing else.
    tok = AutoTokenizer.from_pretrained(m.info["merged_dir"])
    end = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "alpaca": tok.eos_token}[name]
    seen = sft_trainers[-1].train_dataset[0]
    replies = [msg.content + end for msg in first.messages if msg.role == "assistant"]
    assert _label_spans(tok, seen["input_ids"], seen["labels"]) == replies

    # The saved tokenizer renders the sample to the very ids training saw; an altered template
    # (a space before every reply) does not, and the check says so.
    row = {"messages": [msg.model_dump() for msg in first.messages]}
    check_round_trip(Path(m.info["merged_dir"]), row, list(seen["input_ids"]), cfg)
    altered = tmp_path / "altered"
    altered.mkdir()
    for path in Path(m.info["merged_dir"]).iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, altered / path.name)
    (altered / "chat_template.jinja").write_text(
        template.replace("{% generation %}", "{% generation %}{{ ' ' }}"))
    assert AutoTokenizer.from_pretrained(altered).chat_template != template
    with pytest.raises(RuntimeError, match="round trip"):
        check_round_trip(altered, row, list(seen["input_ids"]), cfg)


def test_a_saved_template_that_renders_differently_fails_the_run(
        session_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import tasks.train_common as train_common

    merge = train_common.merge

    def merge_then_alter(*args: object, **kwargs: object) -> None:
        merge(*args, **kwargs)
        saved = Path(args[2]) / "chat_template.jinja"  # merged_dir
        # Not a bare newline after the tag: chat templates trim those (trim_blocks).
        saved.write_text(saved.read_text().replace("{% generation %}",
                                                   "{% generation %}{{ '\\n' }}"))

    monkeypatch.setattr(train_common, "merge", merge_then_alter)
    src = _stage_dir(tmp_path / "in", [_chat(i) for i in range(4)], [])
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="round trip"):
        run_train(src, out, _fast_cfg(max_steps=1, save_steps=100), home=session_home)
    assert not (out / "manifest.json").exists()
