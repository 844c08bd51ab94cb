"""What runs alongside the trainer's steps: the callbacks that log per-step tokens per second and
peak memory, record the step a run starts from and stop early, and the bound on the memory of
trl's fused LM head on CPU."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from data_contracts.config import TrainConfig
from tasks.progress import trainer_progress

log = logging.getLogger(__name__)

# trl's fused LM head on devices without Triton (CPU): tokens per tile and vocabulary columns
# per tile, so each of the fallback's ~6 fp32 temporaries is 512 x 8192 x 4 B = 16 MB at most.
CPU_LOGPROB_TOKENS, CPU_LOGPROB_VOCAB = 512, 8192


def _score_labelled_positions(device: Any) -> bool:
    """Stands in for trl's "is this a Triton device" when it decides whether to score only the
    positions that carry a label: always (see cpu_logprob_tiles)."""
    return True


@contextlib.contextmanager
def cpu_logprob_tiles(enabled: bool) -> Iterator[None]:
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


def batch_tokens(inputs: dict[str, Any]) -> int:
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
                self.counted += batch_tokens(inputs)
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


def stop_on_request_callback() -> Any:
    """A callback that ends training at the next step boundary once a stop was asked for
    (SIGTERM/SIGINT, tasks/interrupt.py), saving a checkpoint first: a rerun resumes there."""
    from transformers import TrainerCallback

    from tasks.interrupt import stop_requested

    class StopOnRequest(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if stop_requested():
                log.warning("stopping training at step %d: saving a checkpoint first",
                            state.global_step)
                control.should_save = True
                control.should_training_stop = True

    return StopOnRequest()


def early_stopping(cfg: TrainConfig, has_eval: bool) -> bool:
    if cfg.early_stopping_patience and not has_eval:
        log.warning("early stopping needs held-out records to evaluate on; it is off")
    return bool(cfg.early_stopping_patience) and has_eval


def training_callbacks(cfg: TrainConfig, has_eval: bool,
                       cuda: bool) -> tuple[Any, Any, list[Any], bool]:
    """The start-step probe, per-step stats and (when configured) early stopping: (probe,
    stats, all callbacks, whether early stopping is on)."""
    start, stats = _start_step_probe(), step_stats_callback(cuda)
    every: list[Any] = [start, stats, trainer_progress(), stop_on_request_callback()]
    early = early_stopping(cfg, has_eval)
    if early:
        from transformers import EarlyStoppingCallback

        every.append(EarlyStoppingCallback(cfg.early_stopping_patience,
                                           cfg.early_stopping_threshold))
    return start, stats, every, early
