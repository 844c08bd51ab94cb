"""The model side of training: the base loaded in 4-bit NF4 for this process of the launch, its
LoRA adapter, the optimizer, and the merge of base and adapter into the exported model."""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path
from typing import Any

from data_contracts.config import TrainConfig
from tasks.base_model import safetensors_only
from tasks.chat_templates import END_OF_TURN

log = logging.getLogger(__name__)


# --- this process of the launch ----------------------------------------------------------------

def process_state() -> Any | None:
    """accelerate's PartialState when `accelerate launch` started several processes, else None.

    Without a GPU it must be asked for the CPU backend (gloo): a plain PartialState() finds no
    GPU, falls back to a single process, and every rank then believes it is the main one.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def under_fsdp() -> bool:
    """Whether `accelerate launch` runs this process with FSDP (it exports this variable)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _local_rank() -> int:
    """This process's device index among the processes `accelerate launch` started on this node.

    With several processes the distributed state is set up here, before loading: it binds this
    process's GPU (bitsandbytes quantizes onto the current device when there is no device_map)
    and transformers' FSDP loading looks for an initialised process group.
    """
    state = process_state()
    return state.local_process_index if state is not None else 0


# --- loading ---------------------------------------------------------------------------------

def compute_dtype(cuda: bool) -> Any:
    import torch

    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU fp32 is the safe default: bf16 autocast is slower on CPUs without AMX/avx512_bf16.
    return torch.float32


def _probe(model: Any) -> None:
    """One small batched forward, so a 4-bit kernel that cannot run here fails now, not later."""
    import torch

    ids = torch.ones((2, 8), dtype=torch.long, device=model.device)
    with torch.no_grad():
        model(input_ids=ids)


def _keep_4bit_trainable(model: Any) -> None:
    """Stop bitsandbytes (0.50, CPU with AVX512-BF16) repacking 4-bit weights for inference.

    An eval-mode forward without grad (our probe, every evaluation) repacks a Linear4bit's weight
    into a bf16 inference layout for good; its kernel has no autograd, so later training steps
    backpropagate wrongly through every base layer (gradients of early LoRA layers ~10x too small).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _4bit_placement(cuda: bool, dtype: Any) -> tuple[dict[str, int] | None, dict[str, Any]]:
    """device_map and extra BitsAndBytesConfig settings for this process of the launch."""
    local_rank = _local_rank()
    if under_fsdp():
        # FSDP flattens the 4-bit weights with the other parameters, so they must be stored in
        # the same (compute) dtype, and it places the shards itself.
        return None, {"bnb_4bit_quant_storage": dtype}
    # Each data-parallel process holds the whole model on its own GPU, not all on GPU 0.
    return ({"": local_rank} if cuda else None), {}


def load_model(base: str, cfg: TrainConfig, cuda: bool) -> tuple[Any, bool, str | None]:
    """The base model in 4-bit NF4 (qlora) or unquantized (lora, or when bitsandbytes fails)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(cuda)
    common = {"trust_remote_code": cfg.trust_remote_code, **safetensors_only(cfg.allow_pickle)}
    fallback_reason = None
    device_map, storage = _4bit_placement(cuda, dtype)
    if cfg.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401  (a broken install fails here, not mid-load)

            bnb = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype, **storage,
            )
            model = AutoModelForCausalLM.from_pretrained(
                base, quantization_config=bnb, dtype=dtype, device_map=device_map, **common)
            _keep_4bit_trainable(model)
            _probe(model)
            return model, True, None
        except Exception as err:  # any bitsandbytes failure: train unquantized instead
            fallback_reason = f"{type(err).__name__}: {err}"
            log.warning("4-bit loading with bitsandbytes failed (%s); training plain "
                        "LoRA without quantization", fallback_reason)
            gc.collect()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **common)
    return model, False, fallback_reason


def load_trainable(base: str, cfg: TrainConfig, cuda: bool) -> tuple[Any, bool, str | None]:
    """load_model, then peft's k-bit preparation of a 4-bit model (SFT, DPO and ORPO alike).

    Not under FSDP: it casts norms and embeddings to fp32 beside bf16-stored 4-bit weights, and
    FSDP cannot flatten parameters of mixed dtypes into one shard.
    """
    model, quantized, fallback_reason = load_model(base, cfg, cuda)
    if quantized and not under_fsdp():
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model, quantized, fallback_reason


def count_linear4bit(model: Any) -> int:
    try:
        import bitsandbytes as bnb
    except Exception:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# --- adapter and optimizer -------------------------------------------------------------------

def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, use_dora=cfg.lora.use_dora, task_type="CAUSAL_LM",
    )


def adapter_to_fp32(model: Any) -> int:
    """Keep the trainable (LoRA) weights in fp32; returns how many tensors were cast.

    trl casts QLoRA adapters to bf16, but resuming reloads a checkpoint's adapter as fp32 (peft's
    autocast), so a resumed run would train in another precision than an uninterrupted one and
    end elsewhere. fp32 is also what peft itself picks: bf16 weights drop every update below
    their resolution (~0.4% of the weight). LoRA weights are small; the memory cost is tiny.
    """
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def optimizer_name(cfg: TrainConfig, cuda: bool, fallback_reason: str | None) -> str:
    """Paged 8-bit AdamW on CUDA; on CPU plain AdamW (bnb's 8-bit one runs there, ~10x slower)."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    if not cuda or fallback_reason is not None:
        return "adamw_torch"  # also when bitsandbytes failed: do not lean on it again
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return "adamw_torch"
    return "paged_adamw_8bit"


# --- export ----------------------------------------------------------------------------------

def merge(base: str, adapter_dir: Path, merged_dir: Path, tokenizer: Any,
          cfg: TrainConfig, template_source: str) -> None:
    """Reload the base unquantized, fold the adapter in, save safetensors + tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype="auto", trust_remote_code=cfg.trust_remote_code,
        **safetensors_only(cfg.allow_pickle))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    end = END_OF_TURN.get(template_source)
    if end and end in tokenizer.get_vocab():
        # The model must stop at the template's end of turn even when eos is another token.
        eos = merged.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        end_id = tokenizer.convert_tokens_to_ids(end)
        if end_id not in eos:
            merged.generation_config.eos_token_id = [*eos, end_id]
    shutil.rmtree(merged_dir, ignore_errors=True)
    merged.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
