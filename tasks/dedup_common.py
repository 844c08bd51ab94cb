"""Stage 3, whatever engine finds the candidate pairs: the one definition of a match and of the
stage's output, so that the in-process engine (tasks.dedup_local) and datatrove's
(tasks.dedup_datatrove) remove the same records, naming the same kept ones.

Here: the Signature of a record (its text form, from tasks.dedup_sketch: exact key, shingle
hashes, MinHash signature and LSH bands), the exact Jaccard, the held-out carve, the decisions
(exact, near, eval contamination; every candidate confirmed by the exact Jaccard), the input
stream with each record's origin, write_stage, which writes the stage directory, and the
persisted index of a stage's kept records (save_index, CorpusIndex).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_contracts.config import DedupConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from data_contracts.stage_outputs import StageOutputError
from tasks.dedup_sketch import SCHEME, BandLSH, sketch
from tasks.io import Quarantined, is_stage_dir, iter_input, read_records
from tasks.stage_dir import StageDir

logger = logging.getLogger(__name__)


@dataclass
class Signature:
    """What dedup needs of one record; the records themselves are re-read when writing."""

    id: str
    origin: str  # "train" or "heldout": where the record was read from
    holdable: bool  # may be carved into the held-out split (see can_hold_out)
    key: bytes  # digest of the normalized text
    grams: np.ndarray  # sorted 32-bit hashes of its shingles, for the exact Jaccard (4 B each)
    # MinHash signature (num_perm uint32) and its LSH bands; None when candidates come from
    # elsewhere (datatrove's clusters)
    sig: np.ndarray | None = None
    bands: list[bytes] | None = None


def can_hold_out(rec: ChatSample) -> bool:
    """Chats and preference pairs can be held out (evaluation scores their replies); plain
    text has no reply to score and always stays in training."""
    return rec.kind in ("chat", "preference")


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two shingle-hash sets (sorted, unique)."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def stream_input(input_path: str | Path | list[str]
                 ) -> Iterator[tuple[str, ChatSample | Quarantined]]:
    """Every input item in a fixed order: train records (train-*), then the held-out split."""
    for item in iter_input(input_path):
        yield "train", item
    if not isinstance(input_path, list) and is_stage_dir(input_path):
        for rec in read_records(input_path, "heldout"):
            yield "heldout", rec


def match_form(text: str, ngram: int) -> tuple[bytes, np.ndarray]:
    """What matching compares of a text, in either engine: its exact key and its sorted shingle
    hashes (tasks.dedup_sketch: normalized, word n-grams, hashed)."""
    one = sketch([text], ngram)
    return one.keys[0], one.grams[0]


def text_sigs(members: list[tuple[str, str]], ngram: int) -> list[Signature]:
    """Exact keys and shingle hashes of (id, text) records without a MinHash: for records whose
    candidate duplicates were found elsewhere (datatrove's clusters)."""
    sk = sketch([text for _, text in members], ngram)
    return [Signature(rid, "", False, key, grams)
            for (rid, _), key, grams in zip(members, sk.keys, sk.grams, strict=True)]


class HeldoutCarver:
    """The held-out split, chosen as records stream past: the input's own held-out split when
    it has one (origin "heldout"), else chats and pairs ranked by sha256(seed:id), the first k
    taken. Only the eval_max best ranks are held, so a corpus of any size needs O(eval_max)
    memory."""

    def __init__(self, cfg: DedupConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.n_holdable = 0
        self.reused: set[int] = set()  # positions of the input's held-out records
        self._worst_first: list[tuple[int, int]] = []  # (-rank, -index): a max-heap of the best

    def add(self, idx: int, origin: str, rid: str, holdable: bool) -> None:
        if origin == "heldout":
            self.reused.add(idx)
        if not holdable:
            return
        self.n_holdable += 1
        if self.cfg.eval_max == 0:
            return
        rank = int(hashlib.sha256(f"{self.seed}:{rid}".encode()).hexdigest(), 16)
        item = (-rank, -idx)
        if len(self._worst_first) < self.cfg.eval_max:
            heapq.heappush(self._worst_first, item)
        elif item > self._worst_first[0]:
            heapq.heapreplace(self._worst_first, item)

    def split(self) -> tuple[set[int], bool]:
        """Indices (stream positions) of the held-out records, and whether they are the input's
        own held-out split (reused) rather than carved."""
        if self.reused:
            return self.reused, True
        if self.cfg.eval_fraction <= 0 or self.n_holdable < 2:
            return set(), False
        k = min(self.cfg.eval_max, math.ceil(self.cfg.eval_fraction * self.n_holdable),
                self.n_holdable - 1)
        best = sorted((-r, -i) for r, i in self._worst_first)[:k]
        return {i for _, i in best}, False


@dataclass
class _Index:
    """The kept records of one split: exact keys, an LSH over their MinHashes for candidates
    and their shingle hashes to confirm each candidate with the exact Jaccard.

    A MinHash estimate alone misses true pairs just above the threshold (its error at 128
    permutations is about +-0.03), and an LSH tuned to the threshold misses more.
    With use_lsh=False every kept record is a candidate: for the members of one datatrove
    cluster, whose candidates were found already.
    """

    cfg: DedupConfig
    use_lsh: bool = True
    exact: dict[bytes, int] = field(default_factory=dict)
    grams: dict[int, np.ndarray] = field(default_factory=dict)
    lsh: BandLSH | None = None

    def __post_init__(self) -> None:
        if self.use_lsh:
            self.lsh = candidate_lsh(self.cfg)

    def match(self, sig: Signature) -> tuple[str, int, float] | None:
        """("exact"|"near", kept index, jaccard) when sig duplicates a kept record."""
        if sig.key in self.exact:
            return "exact", self.exact[sig.key], 1.0
        best: tuple[int, float] | None = None
        candidates = self.lsh.query(sig.bands) if self.lsh is not None else self.grams
        for idx in sorted(candidates):  # sorted: ties go to the first seen
            j = exact_jaccard(sig.grams, self.grams[idx])
            if j >= self.cfg.threshold and (best is None or j > best[1]):
                best = (idx, j)
        return ("near", best[0], best[1]) if best else None

    def add(self, idx: int, sig: Signature) -> None:
        self.exact[sig.key] = idx
        self.grams[idx] = sig.grams
        if self.lsh is not None:
            self.lsh.insert(idx, sig.bands)


Decision = tuple[str, int, float] | None  # (kind, dup_of index, jaccard), None = keep


def candidate_floor(cfg: DedupConfig) -> float:
    """The estimated Jaccard down to which LSH proposes candidates for exact confirmation."""
    return min(cfg.candidate_threshold, cfg.threshold)


def candidate_lsh(cfg: DedupConfig) -> BandLSH:
    """An empty LSH banded for cfg (datasketch MinHashLSH's bands x rows at the candidate
    floor): the in-process candidate index, and the banding datatrove's buckets copy."""
    return BandLSH(candidate_floor(cfg), cfg.num_perm)


def stage_info(cfg: DedupConfig, *, seed: int, reused: bool, executor_choice: str) -> dict:
    """What every engine records in the manifest's info (`heldout`: reused or carved)."""
    return {"heldout": "reused" if reused else "carved", "seed": seed,
            "executor": cfg.executor, "executor_choice": executor_choice}


def decide(sigs: list[Signature], heldout_idx: set[int], cfg: DedupConfig, *,
           use_lsh: bool = True) -> dict[int, Decision]:
    """Dedup the held-out split, then train against it (eval contamination) and itself."""
    decisions: dict[int, Decision] = {}
    heldout, train = _Index(cfg, use_lsh), _Index(cfg, use_lsh)
    for i in sorted(heldout_idx):
        decisions[i] = heldout.match(sigs[i])
        if decisions[i] is None:
            heldout.add(i, sigs[i])
    for i in range(len(sigs)):
        if i in heldout_idx:
            continue
        hit = heldout.match(sigs[i])
        if hit is not None:
            decisions[i] = ("eval_contamination", hit[1], hit[2])
            continue
        decisions[i] = train.match(sigs[i])
        if decisions[i] is None:
            train.add(i, sigs[i])
    return decisions


Removal = tuple[str, str, float]  # (kind, id of the record it duplicates, jaccard)


def write_stage(input_path: str | Path, stage: StageDir, heldout_idx: set[int],
                removed: Mapping[int, Removal], *, info: dict,
                metrics: dict[str, float] | None = None, outputs: list[Path] = ()) -> Manifest:
    """Pass 2 of every dedup path: stream the input again and write each record where its
    decision (by stream position) sends it: held-out, train, or deduplicated naming dup_of."""
    writer = stage.writer()
    kinds: Counter[str] = Counter()
    idx = 0
    for _, item in stream_input(input_path):
        if isinstance(item, Quarantined):
            writer.quarantine(item)
            continue
        if idx in removed:
            kind, dup_of, jaccard = removed[idx]
            kinds[kind] += 1
            writer.duplicate(item, dup_of=dup_of, kind=kind, jaccard=round(jaccard, 4))
        else:
            # "heldout": the manifest's name of the held-out split (heldout-*.jsonl.gz)
            writer.keep(item, split="heldout" if idx in heldout_idx else "train")
        idx += 1
    stage_metrics = {f"dedup.{k}": float(kinds[k]) for k in ("exact", "near", "eval_contamination")}
    logger.info("dedup: %d records, held-out %s (%d), removed %s", idx, info.get("heldout"),
                len(heldout_idx), dict(kinds))
    return writer.finish(idx + writer.manifest.quarantined, outputs=outputs,
                         metrics={**stage_metrics, **(metrics or {})},
                         info=info)


INDEX_NAME = "dedup-index.npz"
# 1 (unversioned, before SCHEME): CRC-32 shingle hashes and datasketch MinHash objects' values.
# 2: SCHEME's shingle hashes and uint32 signatures, with `format` and `scheme` fields.
INDEX_FORMAT = 2


class IndexFormatError(StageOutputError):
    """A persisted dedup index this version cannot match against (its format, hash scheme or
    n-gram/permutation settings differ): comparing it would silently miss duplicates."""


def save_index(path: Path, sigs: list[Signature], splits: list[str], cfg: DedupConfig) -> None:
    """The kept records' signatures (ids, split, exact keys, shingle hashes, MinHash
    signatures): what a later incremental run dedups its new records against without re-reading
    these records. Format INDEX_FORMAT, hash scheme SCHEME (tasks.dedup_sketch)."""
    offsets = np.cumsum([0] + [s.grams.size for s in sigs])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(
        tmp, format=np.array(INDEX_FORMAT), scheme=np.array(SCHEME),
        params=np.array([cfg.ngram, cfg.num_perm]),
        ids=np.array([s.id for s in sigs], dtype=object),
        splits=np.array(splits, dtype=object),
        keys=np.array([s.key for s in sigs], dtype="S16"),
        grams=np.concatenate([s.grams for s in sigs]) if sigs else np.zeros(0, np.uint32),
        offsets=offsets,
        signatures=(np.stack([s.sig for s in sigs]) if sigs
                    else np.zeros((0, cfg.num_perm), np.uint32)))
    tmp.replace(path)


def check_index(path: Path, data: Mapping[str, np.ndarray], cfg: DedupConfig) -> None:
    """Raise IndexFormatError, one line saying to rebuild, unless the index at `path` was
    written in this version's format and hash scheme with cfg's ngram and num_perm."""
    rebuild = "rebuild the curated dataset with a full run (ftflow run)"
    found = int(data["format"]) if "format" in data else 1
    if found != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: dedup index format {found} (written by an earlier "
                               f"ftflow), this version reads format {INDEX_FORMAT}; {rebuild}")
    if str(data["scheme"]) != SCHEME:
        raise IndexFormatError(f"{path}: dedup index hashed with {str(data['scheme'])!r}, not "
                               f"{SCHEME!r}; {rebuild}")
    if tuple(data["params"]) != (cfg.ngram, cfg.num_perm):
        raise IndexFormatError(f"{path}: built with ngram/num_perm {tuple(data['params'])}, not "
                               f"({cfg.ngram}, {cfg.num_perm}); {rebuild}")


class CorpusIndex:
    """The curated corpus of earlier runs, as dedup sees it: new records that duplicate one of
    its records are removed naming that record's id (an incremental run never re-reads it)."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.ids: list[str] = []
        self.heldout, self.train = _Index(cfg), _Index(cfg)

    def __len__(self) -> int:
        return len(self.ids)

    def add_file(self, path: Path) -> None:
        """Add one persisted index file (save_index) of this format, scheme, ngram, num_perm."""
        data = np.load(path, allow_pickle=True)
        check_index(path, data, self.cfg)
        # Each npz member is decompressed on every access: read each one once.
        offsets, all_grams, signatures = data["offsets"], data["grams"], data["signatures"]
        bands = self.train.lsh.band_keys(signatures)
        for j, (rid, split, key) in enumerate(zip(data["ids"], data["splits"], data["keys"])):
            grams = all_grams[offsets[j]:offsets[j + 1]]
            sig = Signature(str(rid), str(split), False, bytes(key), grams, signatures[j], bands[j])
            index = self.heldout if split == "heldout" else self.train
            index.add(len(self.ids), sig)
            self.ids.append(str(rid))

    def match(self, sig: Signature) -> "Removal | None":
        """(kind, id of the corpus record, jaccard) when sig duplicates a corpus record; a match
        with a held-out record is eval contamination."""
        hit = self.heldout.match(sig)
        if hit is not None:
            return "eval_contamination", self.ids[hit[1]], hit[2]
        hit = self.train.match(sig)
        return (hit[0], self.ids[hit[1]], hit[2]) if hit is not None else None
