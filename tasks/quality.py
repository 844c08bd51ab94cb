"""A quality classifier the user trains from their own examples of good and bad records.

``ftflow quality-model train --good FILE... --bad FILE... --output quality.bin`` reads records
in any ftflow input form (chat, ShareGPT, Alpaca, text, preference pairs; the same reader as
ingest), labels every record of a ``--good`` file good and every record of a ``--bad`` file
bad, and trains a fastText supervised classifier on them. Part of each label is held out to
measure accuracy; the report lands beside the model (``quality.json`` for ``quality.bin``).
The ingest stage then drops records whose P(good) is below ``ingest.quality_threshold``.

Two labelled files rather than one file with a label column: the user's examples already exist
as exports in the record forms ftflow reads, and "these files are good, those are bad" is how
people sort them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import random
import re
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from data_contracts.config import FinalError
from data_contracts.records import ChatSample
from tasks.io import Quarantined, iter_input

log = logging.getLogger(__name__)

LABELS = ("good", "bad")
PREFIX = "__label__"
SUFFIXES = (".bin", ".ftz")  # .ftz: quantized (smaller, slightly less accurate)
# Words and single punctuation marks: "Settings > Billing." and "FREE!!!" keep their signal.
TOKEN = re.compile(r"[^\W_]+|[^\w\s]")


class QualityModelError(ValueError, FinalError):
    """Training data or a model file that cannot give a usable classifier; says why."""


def normalize_for_fasttext(text: str) -> str:
    """One lower-cased line of space-separated tokens: fastText reads one example per line."""
    return " ".join(TOKEN.findall(text.lower()))


def quality_text(rec: ChatSample) -> str:
    """What the classifier judges: the record as trained on (a pair's prompt + chosen)."""
    if not rec.messages:
        return normalize_for_fasttext(rec.text or "")
    return normalize_for_fasttext(" ".join(m.content for m in rec.conversation()))


@dataclass
class QualityReport:
    """What a training run learned from, and how well it separates held-out examples."""

    model: str
    examples: dict[str, int]  # per label, after skipping unparseable lines
    train: dict[str, int]
    heldout: dict[str, int]
    heldout_accuracy: float | None  # None when heldout_fraction is 0
    heldout_recall: dict[str, float] = field(default_factory=dict)  # per label, at P = 0.5
    skipped: dict[str, int] = field(default_factory=dict)  # unparseable input lines per label
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def report_path(model_path: str | Path) -> Path:
    """Where the JSON report of a model goes: quality.bin -> quality.json."""
    return Path(model_path).with_suffix(".json")


def _read_texts(paths: Sequence[str | Path], label: str) -> tuple[list[str], int]:
    if not paths:
        raise QualityModelError(f"no --{label} files given")
    texts, skipped = [], []
    for item in iter_input([str(p) for p in paths]):
        if isinstance(item, Quarantined):
            skipped.append(item)
        elif text := quality_text(item):
            texts.append(text)
    if skipped:
        first = skipped[0]
        log.warning("quality-model: skipped %d unparseable %s lines (first: %s:%d: %s)",
                    len(skipped), label, first.source.file, first.source.line, first.error)
    return texts, len(skipped)


def _split(texts: list[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """Shuffle and hold out ``fraction`` of the texts (at least one when fraction > 0)."""
    order = texts[:]
    rng.shuffle(order)
    n_held = max(1, round(len(order) * fraction)) if fraction > 0 else 0
    return order[n_held:], order[:n_held]


M_PERTURB = -6  # glibc mallopt(): fill every malloc'd block with (byte ^ 0xff)


@contextlib.contextmanager
def _zero_filled_malloc() -> Iterator[bool]:
    """While training fastText, every ``malloc`` returns zeroed memory (glibc only).

    The fastText build we pin (fasttext-numpy2-wheel 0.9.2) allocates the input matrix
    without zeroing it, and with ``thread=1`` its random init covers only the first tenth of
    the rows (upstream's block split assumes 10 threads). The other rows hold whatever the heap
    held before: in a fresh interpreter that is mostly zero pages, in a long-lived one it is
    freed garbage, so the same examples trained to different models, diverged ("Encountered
    NaN") at any learning rate, or lost accuracy - only in a full test suite or a busy worker.
    glibc's M_PERTURB makes each allocation start as zeros (upstream's ``std::vector``
    semantics); it is reset to off on exit. Yields False where mallopt is unavailable.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not mallopt(M_PERTURB, 0xFF):
        yield False
        return
    try:
        yield True
    finally:
        mallopt(M_PERTURB, 0)


def _fit(train_file: Path, params: dict[str, Any]) -> tuple[Any, float]:
    """Train, halving the learning rate when fastText diverges.

    On a few hundred lines a high learning rate can blow the softmax up and fastText aborts
    with "Encountered NaN" (docs/environment.md); a smaller step trains the same model more slowly.
    """
    import fasttext

    lr = params["lr"]
    for _ in range(8):  # 50 -> 0.4 in 8 tries
        try:
            model = fasttext.train_supervised(input=str(train_file), **{**params, "lr": lr})
            return model, lr
        except RuntimeError as err:
            if "nan" not in str(err).lower():
                raise
            log.warning("quality-model: fastText diverged at lr=%s, retrying at %s", lr, lr / 2)
            lr /= 2
    raise QualityModelError(
        f"fastText diverged (NaN) down to lr={lr * 2}: give more examples or a lower --lr")


def _recall(model: Any, texts: list[str], label: str) -> list[bool]:
    if not texts:
        return []
    labels, _ = model.predict(texts, k=1)
    return [found[0] == PREFIX + label for found in labels]


def train_quality_model(good: Sequence[str | Path], bad: Sequence[str | Path], out: str | Path,
                        *, epochs: int = 25, lr: float = 0.5, word_ngrams: int = 2,
                        dim: int = 32, bucket: int = 100_000, heldout_fraction: float = 0.2,
                        min_examples: int = 10, seed: int = 0) -> QualityReport:
    """Train a good/bad fastText classifier on the user's examples; write it and its report.

    Raises QualityModelError when a label has fewer than ``min_examples`` records: fastText
    fits any handful of lines perfectly and the held-out figure would mean nothing.
    """
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise QualityModelError(f"--output must end in .bin or .ftz (quantized), got {out}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise QualityModelError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    rng = random.Random(seed)
    texts, skipped = {}, {}
    for label, paths in (("good", good), ("bad", bad)):
        texts[label], skipped[label] = _read_texts(paths, label)
        if len(texts[label]) < min_examples:
            raise QualityModelError(
                f"{len(texts[label])} usable {label} examples; at least {min_examples} per label "
                "are needed (a few dozen each to learn anything that carries over)")
    splits = {label: _split(texts[label], heldout_fraction, rng) for label in LABELS}
    train_lines = [f"{PREFIX}{label} {t}" for label in LABELS for t in splits[label][0]]
    rng.shuffle(train_lines)  # SGD sees the labels interleaved, not in two blocks
    # thread=1 + seed: the same examples give the same model.
    # bucket: hashed word-bigram rows; fastText's 2M default makes a 400 MB model at dim 50.
    params = {"epoch": epochs, "lr": lr, "wordNgrams": word_ngrams, "dim": dim,
              "bucket": bucket, "minCount": 1, "loss": "softmax", "thread": 1, "seed": seed,
              "verbose": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, _zero_filled_malloc() as zeroed:
        if not zeroed:
            log.warning("quality-model: no glibc mallopt here; fastText starts from "
                        "uninitialized memory, so retraining may give a different model")
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(train_lines) + "\n", encoding="utf-8")
        model, used_lr = _fit(train_file, params)
        if out.suffix == ".ftz":
            # Keep the 20k strongest rows: product quantization of all 100k takes ~4x longer.
            model.quantize(input=str(train_file), retrain=True, qnorm=True, cutoff=20_000)
    model.save_model(str(out))
    hits = {label: _recall(model, splits[label][1], label) for label in LABELS}
    n_held = sum(len(h) for h in hits.values())
    report = QualityReport(
        model=str(out),
        examples={label: len(texts[label]) for label in LABELS},
        train={label: len(splits[label][0]) for label in LABELS},
        heldout={label: len(splits[label][1]) for label in LABELS},
        heldout_accuracy=round(sum(sum(h) for h in hits.values()) / n_held, 4) if n_held else None,
        heldout_recall={label: round(sum(h) / len(h), 4) for label, h in hits.items() if h},
        skipped=skipped,
        params={**params, "lr": used_lr, "heldout_fraction": heldout_fraction,
                "quantized": out.suffix == ".ftz"},
    )
    report_path(out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    log.info("quality-model: %s trained on %s, held-out accuracy %s", out, report.train,
             report.heldout_accuracy)
    return report


class QualityModel:
    """A trained good/bad classifier: P(good) for a batch of records."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"ingest.quality_model: no such file: {path}")
        # The file's mtime is part of the cache key: a model retrained in place is reloaded.
        self.model = _load(self.path, Path(path).stat().st_mtime_ns)
        labels = set(self.model.labels)
        if labels != {PREFIX + label for label in LABELS}:
            raise QualityModelError(f"{path}: not an ftflow quality model (labels {sorted(labels)}, "
                                    "expected __label__good and __label__bad)")

    def p_good(self, records: Iterable[ChatSample]) -> list[float]:
        """P(good) of every record, in one fastText call."""
        texts = [quality_text(r) for r in records]
        if not texts:
            return []
        labels, probs = self.model.predict(texts, k=2)
        good = PREFIX + "good"
        return [float(dict(zip(ls, ps)).get(good, 0.0)) for ls, ps in zip(labels, probs)]


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> Any:
    from fasttext.FastText import _FastText

    return _FastText(path)
