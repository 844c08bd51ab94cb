"""Multi-process training through `accelerate launch`: QLoRA under DDP on CPU (gloo), and the
accelerate configs in configs/accelerate/.

No multi-GPU machine is available to CI, so the DDP test launches configs/accelerate/ddp.yaml
with 2 processes on this CPU: accelerate starts them with torchrun and, finding no GPU, they
form a gloo process group. This file is also the script each process runs (see __main__).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
STEPS, PER_DEVICE, WORLD, N_TRAIN = 8, 2, 2, 32


# --- the script every launched process runs --------------------------------------------------

def _worker(base: str, out: Path) -> None:
    """Train QLoRA for a few steps on this rank's share of the data; record what it saw."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from peft import prepare_model_for_kbit_training as prepare_kbit
    from trl import SFTConfig, SFTTrainer

    from data_contracts.config import TrainConfig
    from model_fixtures import support_chats
    from tasks.chat_templates import prepare_tokenizer
    from tasks.train_model import count_linear4bit, load_model
    from tasks.train_sft import sft_row

    torch.set_num_threads(1)  # two processes share two cores
    cfg = TrainConfig(method="qlora", max_length=64)
    tokenizer, _ = prepare_tokenizer(base, cfg)
    model, quantized, fallback = load_model(base, cfg, cuda=False)
    if quantized:
        model = prepare_kbit(model, use_gradient_checkpointing=False)
    rows = [sft_row(r) for r in support_chats(N_TRAIN, seed=3)]
    heldout = [sft_row(r) for r in support_chats(8, seed=4, prefix="h")]
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), max_length=64, max_steps=STEPS,
        per_device_train_batch_size=PER_DEVICE, per_device_eval_batch_size=4,
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1,
        eval_strategy="steps", eval_steps=STEPS, eval_on_start=True, save_strategy="no",
        report_to=[], use_cpu=True, optim="adamw_torch", seed=0, data_seed=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(heldout), processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
    )
    trainer.train()
    # Collective where the model is sharded; only the process with should_save writes.
    trainer.save_model(str(out / "adapter"))
    state = trainer.state
    record = {
        "rank": trainer.args.process_index, "world_size": trainer.args.world_size,
        "should_save": trainer.args.should_save, "quantized": quantized,
        "fallback_reason": fallback, "linear4bit": count_linear4bit(trainer.model),
        "device": str(trainer.model.device), "epoch": state.epoch, "steps": state.global_step,
        "eval_losses": [h["eval_loss"] for h in state.log_history if "eval_loss" in h],
        "lora_abs_sums": {n.replace(".default", ""): float(p.detach().float().abs().sum())
                          for n, p in trainer.model.named_parameters() if p.requires_grad},
    }
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


# --- tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `accelerate launch` of this file with the DDP config on 2 CPU processes."""
    from tasks.base_model import resolve_base_model

    base = resolve_base_model("builtin:tiny-llama", session_home)  # built once, not per rank
    out = tmp_path_factory.mktemp("ddp")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch",
           "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
           "--num_processes", str(WORLD), "--mixed_precision", "no",
           "--main_process_port", "0", __file__, base, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    return {"out": out, "base": base, "ranks": ranks, "wall_s": time.monotonic() - start}


def test_both_ranks_trained_one_model_with_a_global_batch(ddp_run: dict[str, Any]) -> None:
    ranks = ddp_run["ranks"]
    assert sorted(ranks) == [0, 1]
    for rec in ranks.values():
        assert rec["world_size"] == WORLD
        # QLoRA itself, not the unquantized fallback, ran in each process.
        assert rec["quantized"] and rec["fallback_reason"] is None and rec["linear4bit"] > 0
        assert rec["device"] == "cpu"
        assert rec["steps"] == STEPS
        # Each step consumed WORLD x PER_DEVICE distinct records: the data was split, not copied.
        assert rec["epoch"] == pytest.approx(STEPS * WORLD * PER_DEVICE / N_TRAIN)
    # Gradients were all-reduced: both replicas end with the same adapter although each saw
    # different records.
    assert ranks[0]["lora_abs_sums"] == ranks[1]["lora_abs_sums"]
    first, last = ranks[0]["eval_losses"][0], ranks[0]["eval_losses"][-1]
    assert last < first - 0.05, ranks[0]["eval_losses"]


def test_the_adapter_is_written_once_and_loads(ddp_run: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert [r["should_save"] for _, r in sorted(ddp_run["ranks"].items())] == [True, False]
    adapter = ddp_run["out"] / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    trained = ddp_run["ranks"][0]["lora_abs_sums"]
    assert sorted(saved) == sorted(trained)
    for name, tensor in saved.items():
        assert float(tensor.float().abs().sum()) == pytest.approx(trained[name], rel=1e-3)
    # lora_B starts at zero: a non-zero one was trained.
    assert all(float(t.abs().sum()) > 0 for n, t in saved.items() if "lora_B" in n)

    base = AutoModelForCausalLM.from_pretrained(ddp_run["base"], dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)


def _launch_stage(src: Path, out: Path, home: Path, *overrides: str) -> str:
    """`ftflow stage train` under the DDP launch on WORLD CPU processes; its stdout."""
    from tasks.base_model import resolve_base_model

    resolve_base_model("builtin:tiny-llama", home)  # built once, not by both ranks
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch",
           "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
           "--num_processes", str(WORLD), "--mixed_precision", "no",
           "--main_process_port", "0", "-m", "flows.cli", "stage", "train",
           "--input", str(src), "--output", str(out), f"run.home={home}",
           f"train.batch_size={PER_DEVICE}", "train.gradient_checkpointing=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_the_train_stage_under_ddp_writes_one_stage_dir(
        session_home: Path, tmp_path: Path) -> None:
    """`ftflow stage train` itself under the DDP launch: one manifest, adapter and merged model
    from the main process, all ranks trained together (the ranks used to race on merged/)."""
    from data_contracts.manifest import Manifest
    from model_fixtures import support_chats, write_stage_dir
    from tasks.io import read_records

    src = write_stage_dir(tmp_path / "in", support_chats(N_TRAIN, seed=3),
                          support_chats(4, seed=4, prefix="h"))
    out = tmp_path / "out"
    stdout = _launch_stage(src, out, session_home, f"train.max_steps={STEPS // 2}",
                           "train.max_length=64", "train.eval_steps=4", "train.save_steps=4")
    # One process (the main one) wrote and reported the stage.
    assert stdout.count(f"train: in={N_TRAIN + 4} ") == 1, stdout[-3000:]
    m = Manifest.read(out).check()
    assert m.info["world_size"] == WORLD and m.info["quantized"]
    assert m.splits == {"train": N_TRAIN, "heldout": 4}
    assert len(list(read_records(out))) == N_TRAIN  # written once, not once per rank
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "adapter" / "training_args.bin").exists()
    assert (out / "merged" / "config.json").exists()
    # Each optimizer step took WORLD x PER_DEVICE records.
    assert max(h.get("epoch", 0) for h in _history(out)) == pytest.approx(
        (STEPS // 2) * WORLD * PER_DEVICE / N_TRAIN)


def test_dpo_under_ddp_writes_one_stage_dir(session_home: Path, tmp_path: Path) -> None:
    """DPO follows the same protocol: every rank trains its share of the pairs, the main one
    writes the stage."""
    from data_contracts.manifest import Manifest
    from data_contracts.records import ChatSample, Message
    from model_fixtures import write_stage_dir
    from tasks.io import read_records

    def pair(i: int) -> ChatSample:
        return ChatSample(id=f"p{i}", messages=[Message(role="user",
                                                        content=f"Where is order {i}?")],
                          chosen=f"Order {i} ships today; here is the tracking link.",
                          rejected="Not my problem.")

    n_pairs, steps = 16, 2
    src = write_stage_dir(tmp_path / "in", [pair(i) for i in range(n_pairs)], [pair(99)])
    out = tmp_path / "out"
    stdout = _launch_stage(src, out, session_home, "train.objective=dpo",
                           f"train.max_steps={steps}", "train.max_length=48",
                           "train.eval_steps=2", "train.save_steps=2",
                           "train.logging_steps=1")
    assert stdout.count(f"train: in={n_pairs + 1} ") == 1, stdout[-3000:]
    m = Manifest.read(out).check()
    assert m.info["objective"] == "dpo" and m.info["world_size"] == WORLD
    assert m.info["quantized"] and m.splits == {"train": n_pairs, "heldout": 1}
    assert len(list(read_records(out))) == n_pairs
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged" / "config.json").exists()
    history = _history(out)
    assert max(h.get("epoch", 0) for h in history) == pytest.approx(
        steps * WORLD * PER_DEVICE / n_pairs)
    assert any("rewards/margins" in h for h in history)


def test_accelerate_configs_parse_with_accelerates_loader() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(ACCELERATE_CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_processes == 8
    assert ddp.mixed_precision == "bf16"

    fsdp = load_config_from_file(str(ACCELERATE_CONFIGS / "fsdp-qlora.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    # accelerate copies fsdp_config keys onto its --fsdp_* options and silently ignores the
    # rest: every key must be an option of this accelerate version.
    options = {a.dest for a in launch_command_parser()._actions}
    assert set(fsdp.fsdp_config) <= options, set(fsdp.fsdp_config) - options
    expected = {
        "fsdp_version": 1, "fsdp_use_orig_params": False, "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_sync_module_states": True, "fsdp_offload_params": False,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_sharding_strategy": "FULL_SHARD",
    }
    assert {k: fsdp.fsdp_config[k] for k in expected} == expected


@pytest.mark.parametrize("fsdp", [False, True])
def test_load_model_places_4bit_weights_for_the_launch(
        fsdp: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Process 3 of 4 on a GPU node: its own GPU under DDP; bf16 storage, no map under FSDP."""
    import accelerate
    import torch
    import transformers

    import tasks.train_model as train_model
    from data_contracts.config import TrainConfig

    class Rank3:
        local_process_index = 3

        def __init__(self, cpu: bool = False) -> None:
            pass

    calls: list[dict[str, Any]] = []

    def from_pretrained(base: str, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise RuntimeError("no GPU here")  # load_model then falls back to unquantized

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    if fsdp:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    else:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(accelerate, "PartialState", Rank3)
    monkeypatch.setattr(train_model, "compute_dtype", lambda cuda: torch.bfloat16)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="no GPU here"):
        train_model.load_model("unused", TrainConfig(method="qlora"), cuda=True)
    quantized = calls[0]
    bnb = quantized["quantization_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    if fsdp:
        assert quantized["device_map"] is None
        assert bnb.bnb_4bit_quant_storage == torch.bfloat16
    else:
        assert quantized["device_map"] == {"": 3}
        assert bnb.bnb_4bit_quant_storage == torch.uint8


if __name__ == "__main__":  # run by `accelerate launch` in ddp_run, once per process
    _worker(sys.argv[1], Path(sys.argv[2]))
