"""Stage 4: synthetic augmentation with a distilabel teacher, every generation validated.

What is generated: for each seed conversation (a deterministic sample of the train records),
the teacher writes a *fresh final assistant reply* to the same conversation: distilabel's
``ChatGeneration`` task gets the seed's messages up to its last user turn, and the synthetic
record is that context plus the new reply. It adds answer diversity without inventing
questions the data never asked. Generations that fail validation (empty, too short or long,
chat-template tokens leaked, an echo of the prompt, not mostly printable text) are filtered
as ``synthetic_invalid`` with the reason; the originals and the held-out split pass through.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


from data_contracts.config import AugmentConfig, TeacherConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, Message, content_id
from tasks.base_model import resolve_base_model
from tasks.io import Quarantined, iter_input
from tasks.stage_dir import StageDir

log = logging.getLogger(__name__)

INVALID = "synthetic_invalid"
# Chat-template markup of the common families; a clean reply contains none of it.
LEAK_PATTERNS = [
    r"<\|[a-z_]+(\|>)?", r"</?s>", r"<unk>", r"<pad>", r"\[/?INST\]", r"<</?SYS>>",
    r"^(system|user|assistant)\s*$", r"^#{2,3} ?(Instruction|Response):",
]
LEAK_RE = re.compile("|".join(LEAK_PATTERNS), re.IGNORECASE | re.MULTILINE)


def _normalize_for_copy_check(text: str) -> str:
    """Lower-cased, whitespace collapsed: the form in which a reply is compared to its prompt."""
    return " ".join(text.lower().split())


def printable_ratio(text: str) -> float:
    """Share of characters that are printable text (the replacement char U+FFFD is not)."""
    if not text:
        return 0.0
    good = sum(1 for ch in text if (ch.isprintable() or ch in "\n\t") and ch != "\ufffd")
    return good / len(text)


_WORD_RE = re.compile(r"^[\W_]*[^\W\d_]+(?:['’-][^\W\d_]+)*[\W_]*$")


def word_token_ratio(text: str) -> float:
    """Share of whitespace-separated tokens that are words (no digits glued to letters)."""
    tokens = text.split()
    return sum(1 for t in tokens if _WORD_RE.match(t)) / len(tokens) if tokens else 0.0


def validate_generation(text: str | None, prompt: str, cfg: AugmentConfig,
                        special_tokens: tuple[str, ...] = ()) -> str | None:
    """Why a generated reply is unusable, or None when it is valid."""
    if text is None or not text.strip():
        return "empty generation"
    if len(text) > cfg.max_chars:
        return f"too long: {len(text)} chars > {cfg.max_chars}"
    ratio = printable_ratio(text)
    if ratio < cfg.min_printable_ratio:
        return f"not printable text: {ratio:.2f} printable < {cfg.min_printable_ratio}"
    if any(ch == "\ufffd" or (not ch.isprintable() and ch not in "\n\t") for ch in text):
        return "broken characters (control characters or U+FFFD)"
    leaked = LEAK_RE.search(text)
    if leaked is None:
        leaked = next((t for t in special_tokens if t and t in text), None)
    if leaked is not None:
        token = leaked if isinstance(leaked, str) else leaked.group(0)
        return f"chat template or special token leaked: {token.strip()!r}"
    words = len(text.split())
    if words < cfg.min_words:
        return f"too few words: {words} < {cfg.min_words}"
    wratio = word_token_ratio(text)
    if wratio < cfg.min_word_token_ratio:
        return f"not fluent text: {wratio:.2f} of tokens are words < {cfg.min_word_token_ratio}"
    gen, ask = _normalize_for_copy_check(text), _normalize_for_copy_check(prompt)
    if ask and (gen == ask or gen.startswith(ask)):
        return "copies the prompt"
    return None


def choose_seeds(records: list[ChatSample], n: int, seed: int) -> list[ChatSample]:
    """Up to n chat records ending in an assistant reply, chosen by a seeded hash of the id."""
    usable = [r for r in records if r.messages and r.messages[-1].role == "assistant"
              and any(m.role == "user" for m in r.messages)]
    usable.sort(key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).hexdigest())
    return usable[:n]


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_teacher(teacher: TeacherConfig, home: str | Path) -> Any:
    """The distilabel LLM for the teacher config (the API key only ever lives in memory)."""
    kwargs: dict[str, Any] = {"max_new_tokens": teacher.max_new_tokens,
                              "temperature": teacher.temperature}
    if teacher.kind == "openai":
        from distilabel.models.llms import OpenAILLM

        key = os.environ.get(teacher.api_key_env, "")
        if not key:
            raise ValueError(f"augment.teacher.kind=openai reads its API key from the environment "
                             f"variable {teacher.api_key_env}, which is not set")
        extra = {"base_url": teacher.base_url} if teacher.base_url else {}
        return OpenAILLM(model=teacher.model, api_key=key, generation_kwargs=kwargs, **extra)
    from distilabel.models.llms import TransformersLLM

    kwargs["do_sample"] = teacher.temperature > 0
    if teacher.temperature == 0:
        kwargs.pop("temperature")
    path = resolve_base_model(teacher.model, home)
    return TransformersLLM(model=path, device=_device(teacher.device), trust_remote_code=False,
                           generation_kwargs=kwargs)


@contextmanager
def _distilabel_logging() -> Iterator[None]:
    """Undo what distilabel does to logging: it replaces the root handlers (Prefect's, pytest's)
    with a queue that is closed after the run, and silences some libraries' loggers."""
    from distilabel.utils.logging import _SILENT_LOGGERS

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in _SILENT_LOGGERS}
    env_level = os.environ.get("DISTILABEL_LOG_LEVEL")
    os.environ.setdefault("DISTILABEL_LOG_LEVEL", "WARNING")  # its INFO is a line per batch
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
        if env_level is None:
            os.environ.pop("DISTILABEL_LOG_LEVEL", None)


def generate(seeds: list[ChatSample], cfg: AugmentConfig, home: str | Path) -> list[str | None]:
    """One teacher reply per seed, in seed order (None where the teacher failed).

    distilabel runs in a fresh interpreter (spawn), which then forks its step processes. Forked
    straight from this process they can hang or segfault: once it has run torch on more than
    one thread (training in a long-lived worker, an earlier stage or test), torch's OpenMP
    runtime (libgomp) is not fork-safe, and distilabel's pool then waits forever.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_generate_in_fresh_process, seeds, cfg, str(home)).result()


def _generate_in_fresh_process(seeds: list[ChatSample], cfg: AugmentConfig,
                               home: str) -> list[str | None]:
    """_generate in the spawned interpreter, whose step processes fork again where possible.

    A spawned child inherits "spawn" as its default start method, so distilabel would start
    each step process as yet another interpreter importing torch, transformers and distilabel
    afresh (~20 s of the demo's augment stage on 2 cores). This interpreter has run no torch
    work before the pool forks, so fork is safe here.
    """
    import multiprocessing

    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    return _generate(seeds, cfg, home)


def _generate(seeds: list[ChatSample], cfg: AugmentConfig, home: str) -> list[str | None]:
    """generate()'s work, in the process that runs distilabel."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import ChatGeneration

    rows = [{"seed_idx": i, "messages": [m.model_dump() for m in s.messages[:-1]]}
            for i, s in enumerate(seeds)]
    llm = build_teacher(cfg.teacher, home)
    # A throwaway cache dir: distilabel's cache would otherwise land in ~/.cache or the repo.
    with tempfile.TemporaryDirectory(prefix="ftflow-distilabel-") as cache, _distilabel_logging():
        with Pipeline(name="ftflow-augment", cache_dir=cache) as pipeline:
            load = LoadDataFromDicts(data=rows, batch_size=cfg.batch_size)
            chat = ChatGeneration(llm=llm, input_batch_size=cfg.batch_size)
            load >> chat
        distiset = pipeline.run(use_cache=False)
        out_rows = distiset["default"]["train"].to_list()
    replies: list[str | None] = [None] * len(seeds)
    for row in out_rows:
        replies[int(row["seed_idx"])] = row.get("generation")
    return replies


def _special_tokens(cfg: AugmentConfig, home: str | Path) -> tuple[str, ...]:
    """The teacher tokenizer's special tokens, so a leak of any of them is caught."""
    if cfg.teacher.kind != "transformers":
        return ()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base_model(cfg.teacher.model, home))
    return tuple(t for t in tok.all_special_tokens if len(t) > 1)


def synthetic_record(seed: ChatSample, reply: str, teacher: str) -> ChatSample:
    """The seed's context plus the teacher's reply, with a content-hash id."""
    msgs = [*seed.messages[:-1], Message(role="assistant", content=reply)]
    as_dicts = [m.model_dump() for m in msgs]
    return ChatSample(id=content_id(as_dicts, None), messages=msgs,
                      meta={"synthetic": True, "seed_id": seed.id, "teacher": teacher})


def run_augment(input_path: str | Path, out_dir: str | Path, cfg: AugmentConfig, *,
                home: str | Path) -> Manifest:
    """Keep every record and add teacher-written replies that pass validation."""
    stage = StageDir(out_dir, "augment", cfg.digest(), input_path, heldout="carry")
    if (done := stage.finished()) is not None:
        return done
    t0 = time.monotonic()
    writer = stage.writer()
    originals: list[ChatSample] = []
    records_in = 0
    for item in iter_input(input_path):
        records_in += 1
        if isinstance(item, Quarantined):
            writer.quarantine(item)
            continue
        originals.append(item)
        writer.keep(item, split="train")

    seeds = choose_seeds(originals, cfg.max_seed_records, cfg.seed) if cfg.enabled else []
    replies = generate(seeds, cfg, home) if seeds else []
    special = _special_tokens(cfg, home) if seeds else ()
    valid = 0
    for seed, reply in zip(seeds, replies):
        rec = synthetic_record(seed, reply or "", cfg.teacher.model)
        prompt = next(m.content for m in reversed(seed.messages) if m.role == "user")
        why = validate_generation(reply, prompt, cfg, special)
        if why is None:
            valid += 1
            writer.keep(rec, split="train")
        else:
            writer.drop(rec, reason=INVALID, why=why)
    log.info("augment: %d generated, %d valid", len(replies), valid)
    metrics = {"augment.generated": float(len(replies)), "augment.valid": float(valid),
               "augment.invalid": float(len(replies) - valid),
               "augment.seconds": round(time.monotonic() - t0, 3)}
    info = {"enabled": cfg.enabled, "teacher_kind": cfg.teacher.kind,
            "teacher": cfg.teacher.model, "seeds": [s.id for s in seeds]}
    return writer.finish(records_in, generated=len(replies), metrics=metrics, info=info)
