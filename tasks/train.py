"""Stage 5: QLoRA (or plain LoRA) supervised fine-tuning with trl's SFTTrainer.

Reads the train split (``data-*``) and the held-out split (``heldout-*``) of the previous stage,
trains a LoRA adapter on a 4-bit NF4 base (bitsandbytes; on CPU too), resumes from the last
checkpoint after a crash, and writes ``adapter/`` and a full-precision ``merged/`` model, both
safetensors with the chat template, plus ``history.jsonl`` (the trainer's log) for MLflow.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from data_contracts.config import TrainConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.base_model import CHATML_TEMPLATE, resolve_base_model
from data_contracts.stage_outputs import TrainOutput
from tasks.io import read_records
from tasks.progress import trainer_progress
from tasks.stage_dir import StageDir, StageWriter

log = logging.getLogger(__name__)

STAGE = "train"
ADAPTER_DIR, MERGED_DIR, CHECKPOINT_DIR = "adapter", "merged", "checkpoints"
HISTORY_FILE = "history.jsonl"
FINGERPRINT_FILE = "ftflow_fingerprint.json"
# Settings that may change between a killed run and its resumption without invalidating the
# checkpoints: how long to train and how often to log, evaluate and save.
RESUMABLE_FIELDS = {"epochs", "max_steps", "eval_steps", "save_steps", "logging_steps"}

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' }}"
    "{% generation %}{{ message['content'] + (eos_token or '') }}{% endgeneration %}{{ '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama-3": LLAMA3_TEMPLATE, "alpaca": ALPACA_TEMPLATE}
# Marker strings each named template expects to be single tokens, and its end-of-turn token.
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama-3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "alpaca": [],
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>"}


# --- records -------------------------------------------------------------------------------

def _sft_kind(rec: ChatSample) -> str:
    """SFT sees a preference pair as the chat prompt + chosen reply."""
    return "chat" if rec.kind == "preference" else rec.kind


def _row(rec: ChatSample) -> dict[str, Any]:
    if rec.messages:
        return {"messages": [m.model_dump() for m in rec.conversation()]}
    return {"text": rec.text}


def _select_records(input_path: str | Path, writer: StageWriter, tokenizer: Any,
                    cfg: TrainConfig, training_template: str | None,
                    can_mask: bool) -> tuple[list[ChatSample], list[ChatSample], int, str]:
    """Split the input into train/eval records of one kind; every other record is dropped."""
    train = list(read_records(input_path, "data"))
    heldout = list(read_records(input_path, "heldout"))
    # Chat records win: a text record in a chat run has no assistant turn to learn from.
    kind = "chat" if any(_sft_kind(r) == "chat" for r in train) else "text"
    assistant_only = can_mask and kind == "chat"
    used: dict[str, list[ChatSample]] = {"train": [], "eval": []}
    for split, records in (("train", train), ("eval", heldout)):
        for rec in records:
            if _sft_kind(rec) != kind:
                writer.drop(rec, f"{rec.kind}_in_{kind}_run", split=split)
            elif assistant_only and not _assistant_in_window(rec, tokenizer, cfg.max_length,
                                                             training_template):
                # trl would silently drop it: the prompt alone fills max_length.
                writer.drop(rec, "no_assistant_tokens_within_max_length", split=split,
                            max_length=cfg.max_length)
            else:
                writer.keep(rec, split)
                used[split].append(rec)
    if not used["train"]:
        raise ValueError(f"{input_path}: no usable training records (kind {kind})")
    return used["train"], used["eval"], len(train) + len(heldout), kind


def _assistant_in_window(rec: ChatSample, tokenizer: Any, max_length: int,
                         template: str | None) -> bool:
    out = tokenizer.apply_chat_template(
        _row(rec)["messages"], tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, chat_template=template,
    )
    return any(out["assistant_masks"][:max_length])


# --- tokenizer and chat template -------------------------------------------------------------

def _prepare_tokenizer(base: str, cfg: TrainConfig) -> tuple[Any, str]:
    """Load the tokenizer and fix its chat template: its own, or a named one we define."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
    name = cfg.chat_template
    if name == "auto" and tokenizer.chat_template:
        source = "tokenizer"
    else:
        if name == "auto":
            log.warning("%s has no chat template; using chatml", base)
            name = "chatml"
        vocab = tokenizer.get_vocab()
        missing = [t for t in TEMPLATE_TOKENS[name] if t not in vocab]
        if missing:
            log.warning("chat template %s: %s are not tokens of this vocabulary and will be split "
                        "into pieces", name, missing)
        tokenizer.chat_template = NAMED_TEMPLATES[name]
        source = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


def _training_template(tokenizer: Any) -> tuple[str | None, str | None]:
    """The template trl will tokenize with for assistant-only loss, or why it cannot mask.

    Returns (template or None when the tokenizer's own one has generation markers, problem).
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None, None
    try:
        return get_training_chat_template(tokenizer), None
    except ValueError as err:
        return None, f"chat template has no {{% generation %}} markers and trl cannot patch it: {err}"


# --- model -----------------------------------------------------------------------------------

def _compute_dtype(cuda: bool) -> Any:
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


def _under_fsdp() -> bool:
    """Whether `accelerate launch` runs this process with FSDP (it exports this variable)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _local_rank() -> int:
    """This process's device index among the processes `accelerate launch` started on this node.

    With several processes the distributed state is set up here, before loading: it binds this
    process's GPU (bitsandbytes quantizes onto the current device when there is no device_map)
    and transformers' FSDP loading looks for an initialised process group.
    """
    state = _process_state()
    return state.local_process_index if state is not None else 0


def _4bit_placement(cuda: bool, dtype: Any) -> tuple[dict[str, int] | None, dict[str, Any]]:
    """device_map and extra BitsAndBytesConfig settings for this process of the launch."""
    local_rank = _local_rank()
    if _under_fsdp():
        # FSDP flattens the 4-bit weights with the other parameters, so they must be stored in
        # the same (compute) dtype, and it places the shards itself.
        return None, {"bnb_4bit_quant_storage": dtype}
    # Each data-parallel process holds the whole model on its own GPU, not all on GPU 0.
    return ({"": local_rank} if cuda else None), {}


def _load_model(base: str, cfg: TrainConfig, cuda: bool) -> tuple[Any, bool, str | None]:
    """The base model in 4-bit NF4 (qlora) or unquantized (lora, or when bitsandbytes fails)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _compute_dtype(cuda)
    common = {"trust_remote_code": cfg.trust_remote_code}
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


def _optimizer(cfg: TrainConfig, cuda: bool, fallback_reason: str | None) -> str:
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


def _count_linear4bit(model: Any) -> int:
    try:
        import bitsandbytes as bnb
    except Exception:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# --- checkpoints -----------------------------------------------------------------------------

def _fingerprint(cfg: TrainConfig, digests: dict[str, str], seed: int) -> dict[str, Any]:
    settings = cfg.model_dump(mode="json", exclude=RESUMABLE_FIELDS)
    return {"config": settings, "inputs": digests, "seed": seed}


def _last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The highest checkpoint-N whose trainer state was written (the trainer writes it last).

    transformers' get_last_checkpoint takes the highest folder even when a kill interrupted
    its saving, and resuming from that half-written folder fails.
    """
    done = [p for p in ckpt_dir.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _resume_point(ckpt_dir: Path, fingerprint: dict[str, Any]) -> str | None:
    """The last checkpoint of an interrupted run of the same job, else None (stale ones go)."""
    marker = ckpt_dir / FINGERPRINT_FILE
    if ckpt_dir.is_dir():
        same = marker.exists() and json.loads(marker.read_text()) == fingerprint
        last = _last_complete_checkpoint(ckpt_dir) if same else None
        if last:
            log.info("resuming from %s", last)
            return last
        if not same:
            log.info("checkpoints in %s belong to another config or input; removing", ckpt_dir)
            shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(fingerprint, sort_keys=True))
    return None


def _adapter_to_fp32(model: Any) -> int:
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


# trl's fused LM head on devices without Triton (CPU): tokens per tile and vocabulary columns
# per tile, so each of the fallback's ~6 fp32 temporaries is 512 x 8192 x 4 B = 16 MB at most.
CPU_LOGPROB_TOKENS, CPU_LOGPROB_VOCAB = 512, 8192


def _score_labelled_positions(device: Any) -> bool:
    """Stands in for trl's "is this a Triton device" when it decides whether to score only the
    positions that carry a label: always (see _cpu_logprob_tiles)."""
    return True


@contextlib.contextmanager
def _cpu_logprob_tiles(enabled: bool) -> Iterator[None]:
    """Bound the memory of trl's fused LM head (SFT's loss) where it runs without Triton.

    trl computes per-token log-probs without full logits, in tiles; on CUDA a Triton kernel folds
    each tile, elsewhere torch ops do, on the whole tile at once: 4096 tokens x 32768 columns
    per tile, ~6 temporaries of that size alive together in backward. With the tiny model it
    was 96% of a step's peak live tensor memory (a batch of 8 x 512 tokens: 995 MB, of which a
    511 MB buffer, mostly untouched pages, and seven 62 MB temporaries); with a 128k vocabulary
    each temporary would be 512 MB.
    Smaller tiles bound them, and off Triton trl also scores every position, prompt and
    padding included, where only labelled (assistant) positions count: scoring only those is
    what it does on CUDA, gives the same loss, and skips the wasted LM-head work.
    The module globals are trl 1.16's (pinned); tests/test_train.py fails if they move.
    """
    if not enabled:
        yield
        return
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    saved = (kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_utils._use_triton)
    kernel.TOKEN_CHUNK_SIZE = CPU_LOGPROB_TOKENS
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LOGPROB_VOCAB
    trl_utils._use_triton = _score_labelled_positions
    try:
        yield
    finally:
        (kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE,
         trl_utils._use_triton) = saved


def _start_step_probe() -> Any:
    from transformers import TrainerCallback

    class StartStep(TrainerCallback):
        """Records the step training starts from (after a checkpoint has been loaded)."""

        step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step = state.global_step

    return StartStep()


def peak_mem_mb(cuda: bool) -> float:
    """Peak memory of this process so far: the CUDA allocator's peak on GPU, else peak RSS."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:  # VmHWM is the kernel's resident-set high-water mark, in kB
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # no procfs (macOS): ru_maxrss, which is bytes there and kB on Linux
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _batch_tokens(inputs: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a batch; a preference batch counts chosen and rejected."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    # ORPO's batches hold prompt_, chosen_ and rejected_ masks; chosen/rejected include the prompt.
    return int(sum(mask.sum() for key, mask in inputs.items()
                   if key.endswith("attention_mask") and not key.startswith("prompt_")))


def step_stats_callback(cuda: bool) -> Any:
    """A callback adding ``tokens_per_s`` and ``peak_mem_mb`` to every training log row.

    The rows go to history.jsonl and from there to MLflow, one point per logged step.
    """
    from transformers import TrainerCallback

    class StepStats(TrainerCallback):
        """Tokens per second of training time since the last log, and peak memory so far."""

        def __init__(self) -> None:
            self.counted = 0  # tokens of the batches, for trainers without trl's count (ORPO)
            self._logged_tokens = 0
            self._busy = 0.0  # training seconds since the last log, evaluation and saving left out
            # The kernel updates its high-water mark lazily, so a later reading can be a little
            # lower: keep the maximum, a peak never falls.
            self._peak = 0.0
            self._mark = time.perf_counter()

        def count_batches(self, trainer: Any) -> None:
            """Count tokens from the batches' attention masks when the trainer does not itself."""
            if hasattr(trainer, "_total_train_tokens"):  # SFT and DPO: trl logs num_tokens
                return
            step = trainer.training_step

            def counted(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                self.counted += _batch_tokens(inputs)
                return step(model, inputs, *args, **kwargs)

            trainer.training_step = counted

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            self._busy += now - self._mark
            self._mark = now

        def _skip(self, *args: Any, **kwargs: Any) -> None:
            self._mark = time.perf_counter()  # the time since the step ended was not training

        on_evaluate = on_save = _skip

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if not logs or "loss" not in logs:  # evaluation rows and the final summary
                return
            tokens = int(logs.get("num_tokens", self.counted))  # trl's count is cumulative
            self._peak = max(self._peak, round(peak_mem_mb(cuda), 1))
            extra = {"peak_mem_mb": self._peak}
            if self._busy > 0:
                extra["tokens_per_s"] = (tokens - self._logged_tokens) / self._busy
            self._logged_tokens, self._busy = tokens, 0.0
            logs.update(extra)
            # The trainer appended a copy of logs to the history before calling us.
            last = state.log_history[-1] if state.log_history else {}
            if last.get("loss") == logs["loss"] and last.get("step") == state.global_step:
                last.update(extra)

    return StepStats()


# --- outputs ---------------------------------------------------------------------------------

def _merge(base: str, adapter_dir: Path, merged_dir: Path, tokenizer: Any,
           cfg: TrainConfig, template_source: str) -> None:
    """Reload the base unquantized, fold the adapter in, save safetensors + tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype="auto", trust_remote_code=cfg.trust_remote_code)
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


def _encode(tokenizer: Any, row: dict[str, Any], template: str | None = None) -> list[int]:
    """A row's token ids as trl renders them (chat template, or text with EOS appended)."""
    if "messages" in row:
        return list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                  chat_template=template)["input_ids"])
    text, eos = row["text"], tokenizer.eos_token or ""
    return list(tokenizer(text if text.endswith(eos) else text + eos)["input_ids"])


def _trained_ids(trainer: Any, tokenizer: Any, row: dict[str, Any], template: str | None,
                 packing: bool) -> list[int]:
    """The ids training saw for the first train row: trl's tokenized row itself, unless packing
    merged rows, then trl's rendering of it (the training template, which trl may have patched)."""
    if not packing:
        return list(trainer.train_dataset[0]["input_ids"])
    return _encode(tokenizer, row, template)


def _check_round_trip(merged_dir: Path, row: dict[str, Any], expected: list[int],
                      cfg: TrainConfig) -> None:
    """The saved tokenizer must render a training sample to the very ids we trained on."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(merged_dir),
                                             trust_remote_code=cfg.trust_remote_code)
    got = _encode(reloaded, row)
    if len(expected) >= cfg.max_length:  # trl truncated the sample to max_length
        got = got[:len(expected)]
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                  min(len(got), len(expected)))
        raise RuntimeError(
            f"chat template round trip failed: the tokenizer saved in {merged_dir} encodes a "
            f"training sample differently from the training tokenizer (first difference at "
            f"token {at}: {got[at:at + 5]} vs {expected[at:at + 5]}); the exported model would "
            "be prompted in a format it was not trained on")


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w") as fh:
        for entry in history:
            fh.write(json.dumps(entry) + "\n")


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return float(values[-1]) if values else None


# --- the stage -------------------------------------------------------------------------------

def _sft_config(cfg: TrainConfig, ckpt_dir: Path, cuda: bool, dtype: Any, optim: str,
                has_eval: bool, assistant_only: bool, seed: int) -> Any:
    import torch
    from trl import SFTConfig

    early = _early_stopping(cfg, has_eval)
    best = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
            "greater_is_better": False} if early else {}
    return SFTConfig(
        output_dir=str(ckpt_dir), max_length=cfg.max_length, packing=cfg.packing,
        assistant_only_loss=assistant_only,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a ratio
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_steps,
        eval_on_start=has_eval,  # step 0: the base model's eval loss starts the curve
        # Early stopping exports the best checkpoint, so there must be one at every evaluation.
        save_strategy="steps", save_steps=cfg.eval_steps if early else cfg.save_steps,
        save_total_limit=2, **best,
        logging_steps=cfg.logging_steps, report_to=[], use_cpu=not cuda, optim=optim,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        seed=seed, data_seed=seed, disable_tqdm=True,
        ddp_find_unused_parameters=False,  # LoRA uses every adapter: no extra pass per step
    )


def _save_adapter(trainer: Any, adapter_dir: Path, is_main: bool) -> None:
    """The LoRA adapter as safetensors, written by the main process only.

    Under FSDP the adapter's weights are sharded: every process must take part in gathering
    them (a full state dict), and the trainer's save does that collectively.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(adapter_dir))
        if is_main:
            (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: not exported
    elif is_main:
        trainer.model.save_pretrained(str(adapter_dir))


def _load_trainable(base: str, cfg: TrainConfig, cuda: bool) -> tuple[Any, bool, str | None]:
    """_load_model, then peft's k-bit preparation of a 4-bit model (SFT, DPO and ORPO alike).

    Not under FSDP: it casts norms and embeddings to fp32 beside bf16-stored 4-bit weights, and
    FSDP cannot flatten parameters of mixed dtypes into one shard.
    """
    model, quantized, fallback_reason = _load_model(base, cfg, cuda)
    if quantized and not _under_fsdp():
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model, quantized, fallback_reason


def _callbacks(cfg: TrainConfig, has_eval: bool,
               cuda: bool) -> tuple[Any, Any, list[Any], bool]:
    """The start-step probe, per-step stats and (when configured) early stopping: (probe,
    stats, all callbacks, whether early stopping is on)."""
    start, stats = _start_step_probe(), step_stats_callback(cuda)
    callbacks: list[Any] = [start, stats, trainer_progress()]
    early = _early_stopping(cfg, has_eval)
    if early:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience,
                                               cfg.early_stopping_threshold))
    return start, stats, callbacks, early


class Ranks:
    """The processes `accelerate launch` started for this stage; one process when not launched.

    Every process trains (DDP splits the batches, FSDP the weights), and only the main one
    writes the stage: records, the checkpoint marker, adapter, merged model and manifest.
    Shared by SFT and DPO/ORPO so both follow one protocol.
    """

    def __init__(self) -> None:
        self.state = _process_state()
        self.is_main = self.state is None or self.state.is_main_process
        self.world_size = self.state.num_processes if self.state is not None else 1
        # The others keep their (identical) selection of records in a scratch directory.
        self._scratch = None if self.is_main else Path(tempfile.mkdtemp(prefix="ftflow-rank"))

    def writer(self, stage: StageDir) -> StageWriter:
        return stage.writer(into=self._scratch)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def resume_point(self, ckpt_dir: Path, fingerprint: dict[str, Any]) -> str | None:
        """The main process may remove stale checkpoints and writes the marker: it goes first."""
        resume_from = _resume_point(ckpt_dir, fingerprint) if self.is_main else None
        self.barrier()
        return resume_from if self.is_main else _resume_point(ckpt_dir, fingerprint)

    def save_adapter(self, trainer: Any, adapter_dir: Path) -> Manifest | None:
        """Write the adapter (collectively where it is sharded). On the other processes the stage
        ends here: the returned manifest says so; the main one gets None and goes on."""
        if self.is_main:
            shutil.rmtree(adapter_dir, ignore_errors=True)
        self.barrier()
        _save_adapter(trainer, adapter_dir, self.is_main)
        if self.is_main:
            return None
        # The main process merges (minutes for an 8B model): no barrier after this point, or
        # the others could hit the process group's timeout waiting for it.
        shutil.rmtree(self._scratch, ignore_errors=True)
        return Manifest(stage=STAGE, info={"rank": self.state.process_index,
                                           "main_process": False})


def _process_state() -> Any | None:
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


def _early_stopping(cfg: TrainConfig, has_eval: bool) -> bool:
    if cfg.early_stopping_patience and not has_eval:
        log.warning("early stopping needs held-out records to evaluate on; it is off")
    return bool(cfg.early_stopping_patience) and has_eval


def run_train(input_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
              home: str | Path, seed: int = 42) -> Manifest:
    """Fine-tune the base model with (Q)LoRA on the input's chat or text records; with
    train.objective dpo or orpo, on its preference pairs instead (tasks/train_pref.py)."""
    if cfg.objective != "sft":
        from tasks.train_pref import run_train_pref  # it builds on this module's helpers

        return run_train_pref(input_path, out_dir, cfg, home=home, seed=seed)
    out = Path(out_dir)
    stage = StageDir(out, STAGE, cfg.digest(), input_path)
    if (done := stage.finished()) is not None:
        return done
    digests = stage.digests

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    base = resolve_base_model(cfg.base_model, home)
    cuda = torch.cuda.is_available()
    tokenizer, template_source = _prepare_tokenizer(base, cfg)
    training_template, mask_problem = _training_template(tokenizer)
    ranks = Ranks()  # under `accelerate launch`: all train, the main process writes
    writer = ranks.writer(stage)
    can_mask = cfg.assistant_only_loss and mask_problem is None
    train_recs, eval_recs, records_in, kind = _select_records(
        input_path, writer, tokenizer, cfg, training_template, can_mask)
    # Assistant-only loss only makes sense on chat records with a template that can mask.
    assistant_only = cfg.assistant_only_loss and kind == "chat" and mask_problem is None
    if cfg.assistant_only_loss and kind == "chat" and mask_problem:
        log.warning("training on whole conversations, not only assistant turns: %s",
                    mask_problem)

    model, quantized, fallback_reason = _load_trainable(base, cfg, cuda)
    optim = _optimizer(cfg, cuda, fallback_reason)
    ckpt_dir = out / CHECKPOINT_DIR
    resume_from = ranks.resume_point(ckpt_dir, _fingerprint(cfg, digests, seed))

    rows = [_row(r) for r in train_recs]
    args = _sft_config(cfg, ckpt_dir, cuda, _compute_dtype(cuda), optim, bool(eval_recs),
                       assistant_only, seed)
    peft_config = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, use_dora=cfg.lora.use_dora, task_type="CAUSAL_LM",
    )
    start, stats, callbacks, early = _callbacks(cfg, bool(eval_recs), cuda)
    trainer = SFTTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list([_row(r) for r in eval_recs]) if eval_recs else None,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )
    # For the round trip check after export.
    expected_ids = _trained_ids(trainer, tokenizer, rows[0], getattr(trainer, "chat_template", None),
                                cfg.packing)
    _adapter_to_fp32(trainer.model)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    linear4bit = _count_linear4bit(trainer.model)
    with _cpu_logprob_tiles(not cuda):
        result = trainer.train(resume_from_checkpoint=resume_from)
        evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
        best_step = trainer.state.best_global_step if early else None
        loaded_best = best_step is not None and best_step != trainer.state.global_step
        if eval_recs and (loaded_best or not evaluated
                          or evaluated[-1] != trainer.state.global_step):
            trainer.evaluate()  # the final eval loss, of the model we export
    history = trainer.state.log_history
    tokens_seen = float(getattr(trainer, "_total_train_tokens", 0) or 0)

    adapter_dir, merged_dir = out / ADAPTER_DIR, out / MERGED_DIR
    if (not_main := ranks.save_adapter(trainer, adapter_dir)) is not None:
        return not_main
    tokenizer.save_pretrained(str(adapter_dir))
    final_step, planned_steps = trainer.state.global_step, trainer.state.max_steps
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    _merge(base, adapter_dir, merged_dir, tokenizer, cfg, template_source)
    _check_round_trip(merged_dir, rows[0], expected_ids, cfg)
    _write_history(out / HISTORY_FILE, history)

    runtime = float(result.metrics.get("train_runtime", 0.0))
    metrics: dict[str, float] = {
        "train_loss": _last(history, "loss") or float(result.training_loss),
        "train_runtime_s": runtime,
        "train_tokens_per_s": tokens_seen / runtime if runtime > 0 else 0.0,
        "train_tokens": tokens_seen,
        "trainable_params": float(trainable),
        "trainable_share": trainable / total if total else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": float(final_step),
        "steps_run": float(final_step - start.step),
    }
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    if eval_losses:
        metrics["eval_loss"] = float(eval_losses[-1])
        metrics["eval_loss_initial"] = float(eval_losses[0])
    info = {
        "adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir), "base_model": base,
        "quantized": quantized, "linear4bit_modules": linear4bit, "method": cfg.method,
        "fallback_reason": fallback_reason, "optimizer": optim,
        "history_file": str(out / HISTORY_FILE), "data_kind": kind,
        "assistant_only_loss": assistant_only, "assistant_mask_problem": mask_problem,
        "chat_template": template_source, "device": "cuda" if cuda else "cpu",
        "compute_dtype": str(_compute_dtype(cuda)).removeprefix("torch."),
        "resumed_from_step": start.step, "seed": seed, "use_dora": cfg.lora.use_dora,
        "group_by_length": cfg.group_by_length, "packing": cfg.packing,
        "early_stopping": early, "best_step": best_step,
        "stopped_early": early and final_step < planned_steps,
        "world_size": ranks.world_size,
    }
    log.info("trained %s for %d steps (from %d): train loss %.3f, eval loss %s",
             base, final_step, start.step, metrics["train_loss"], metrics.get("eval_loss"))
    return writer.finish(records_in, metrics=metrics, info=info,
                         output=TrainOutput.model_validate(info),
                         outputs=[adapter_dir, merged_dir, out / HISTORY_FILE])
