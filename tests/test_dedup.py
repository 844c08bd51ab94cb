"""Stage 3: held-out split, exact + MinHash near dedup and decontamination, on planted records."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from model_fixtures import write_stage_dir as _stage_dir

from data_contracts.config import DedupConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, Message
from data_contracts.stage_outputs import StageOutputError
from tasks.dedup import run_dedup
from tasks.dedup_common import INDEX_FORMAT, INDEX_NAME, IndexFormatError, exact_jaccard
from tasks.dedup_local import signatures
from tasks.dedup_sketch import SCHEME, normalize_for_matching, shingle_hash, shingles, sketch
from tasks.io import read_records

VOCAB = [f"w{i}" for i in range(400)] + "the a of to and in on for with data model".split()


def _words(seed: int, n: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def _chat(rid: str, words: list[str] | str) -> ChatSample:
    text = words if isinstance(words, str) else " ".join(words)
    return ChatSample(id=rid, messages=[Message(role="user", content=text),
                                        Message(role="assistant", content="Sure.")])


def _removed(stage_dir: Path) -> dict[str, dict]:
    path = stage_dir / "deduplicated.jsonl.gz"
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    return {row["record"]["id"]: row for row in rows}


def _ids(stage_dir: Path, split: str = "train") -> list[str]:
    return [r.id for r in read_records(stage_dir, split)]


NO_SPLIT = DedupConfig(eval_fraction=0.0)


def test_normalize_and_short_text_shingles():
    assert normalize_for_matching("  Hello,   WORLD!\n It's  me. ") == "hello world its me"
    assert shingles("a b c", 5) == {b"a b c"}
    assert len(shingles(" ".join("abcdefg"), 5)) == 3


def test_exact_and_near_duplicates_removed_naming_kept(tmp_path: Path):
    base = _words(1)
    near = list(base)
    near[60] = "CHANGED"
    train = [
        _chat("orig", base),
        _chat("exact", "  " + " ".join(w.upper() for w in base) + " !!"),  # case/space/punct
        _chat("near", near),
        _chat("distinct", _words(2)),
        _chat("short-1", "Hello there!"),
        _chat("short-2", "hello,   THERE"),
    ]
    out = tmp_path / "03-dedup"
    m = run_dedup(_stage_dir(tmp_path / "in", train), out, NO_SPLIT, home=tmp_path)
    m.check()
    assert _ids(out) == ["orig", "distinct", "short-1"]
    removed = _removed(out)
    assert removed["exact"]["kind"] == "exact" and removed["exact"]["dup_of"] == "orig"
    assert removed["short-2"]["kind"] == "exact" and removed["short-2"]["dup_of"] == "short-1"
    assert removed["near"]["kind"] == "near" and removed["near"]["dup_of"] == "orig"
    assert 0.8 <= removed["near"]["jaccard"] < 1.0
    assert (m.records_in, m.kept, m.deduplicated) == (6, 3, 3)
    assert m.metrics == {"dedup.exact": 2.0, "dedup.near": 1.0, "dedup.eval_contamination": 0.0}
    assert m.splits == {"train": 3}


def test_train_copies_of_eval_are_removed_as_contamination(tmp_path: Path):
    leaked = _words(10)
    paraphrase = list(leaked)
    paraphrase[5] = "CHANGED"
    heldout = [_chat("eval-a", leaked), _chat("eval-b", _words(11)),
               _chat("eval-a-again", leaked)]
    train = [_chat("t1", _words(12)), _chat("t-copy", leaked), _chat("t-para", paraphrase),
             _chat("t2", _words(13))]
    out = tmp_path / "out"
    m = run_dedup(_stage_dir(tmp_path / "in", train, heldout), out, DedupConfig(), home=tmp_path)
    m.check()
    assert m.info["heldout"] == "reused"  # no re-split of an existing held-out set
    assert _ids(out, "heldout") == ["eval-a", "eval-b"]
    assert _ids(out) == ["t1", "t2"]
    removed = _removed(out)
    assert removed["eval-a-again"]["kind"] == "exact"  # dedup within eval too
    assert removed["t-copy"] == {**removed["t-copy"], "kind": "eval_contamination",
                                 "dup_of": "eval-a", "jaccard": 1.0}
    assert removed["t-para"]["kind"] == "eval_contamination"
    assert removed["t-para"]["dup_of"] == "eval-a"
    assert m.splits == {"train": 2, "heldout": 2}
    assert m.metrics["dedup.eval_contamination"] == 2.0 and m.metrics["dedup.exact"] == 1.0
    assert (m.records_in, m.deduplicated) == (7, 3)


def test_split_is_carved_deterministically_before_dedup(tmp_path: Path):
    train = [_chat(f"r{i:02d}", _words(100 + i, 40)) for i in range(40)]
    train.append(ChatSample(id="doc", text=" ".join(_words(999, 40))))  # text: never eval
    src = _stage_dir(tmp_path / "in", train)
    cfg = DedupConfig(eval_fraction=0.25, eval_max=200)
    run_dedup(src, tmp_path / "a", cfg, home=tmp_path, seed=42)
    run_dedup(src, tmp_path / "b", cfg, home=tmp_path, seed=42)
    run_dedup(src, tmp_path / "c", cfg, home=tmp_path, seed=7)
    eval_a = _ids(tmp_path / "a", "heldout")
    assert len(eval_a) == 10 and "doc" not in eval_a
    assert eval_a == _ids(tmp_path / "b", "heldout")
    assert set(eval_a) != set(_ids(tmp_path / "c", "heldout"))
    m = Manifest.read(tmp_path / "a").check()
    assert m.splits == {"train": 31, "heldout": 10} and m.info["heldout"] == "carved"
    assert set(_ids(tmp_path / "a")) | set(eval_a) == {r.id for r in train}
    capped = run_dedup(src, tmp_path / "d", DedupConfig(eval_fraction=0.25, eval_max=3),
                       home=tmp_path)
    assert capped.splits["heldout"] == 3


def test_preference_pairs_are_held_out_like_chats(tmp_path: Path):
    # A DPO corpus holds only pairs: without them in the carve it would have no held-out split.
    pairs = [ChatSample(id=f"p{i:02d}", messages=[Message(role="user",
                                                          content=" ".join(_words(300 + i, 30)))],
                        chosen="Happy to help.", rejected="No.") for i in range(20)]
    src = _stage_dir(tmp_path / "in", pairs)
    m = run_dedup(src, tmp_path / "out", DedupConfig(eval_fraction=0.2), home=tmp_path).check()
    assert m.splits == {"train": 16, "heldout": 4}
    held = list(read_records(tmp_path / "out", "heldout"))
    assert all(r.kind == "preference" and r.rejected == "No." for r in held)


def test_rerun_on_a_dir_with_heldout_reuses_it(tmp_path: Path):
    train = [_chat(f"r{i:02d}", _words(200 + i, 30)) for i in range(20)]
    first = tmp_path / "03-dedup"
    run_dedup(_stage_dir(tmp_path / "in", train), first, DedupConfig(eval_fraction=0.2),
              home=tmp_path)
    second = tmp_path / "07-dedup-synthetic"
    m = run_dedup(first, second, DedupConfig(eval_fraction=0.5), home=tmp_path, seed=1)
    assert m.info["heldout"] == "reused"
    assert _ids(second, "heldout") == _ids(first, "heldout") and len(_ids(first, "heldout")) == 4
    assert _ids(second) == _ids(first)
    assert (m.records_in, m.kept, m.deduplicated) == (20, 20, 0)


def test_unchanged_input_is_skipped(tmp_path: Path):
    src = _stage_dir(tmp_path / "in", [_chat("a", _words(1)), _chat("b", _words(1))])
    first = run_dedup(src, tmp_path / "out", NO_SPLIT, home=tmp_path)
    again = run_dedup(src, tmp_path / "out", NO_SPLIT, home=tmp_path)
    assert again.started_at == first.started_at and again.deduplicated == 1
    reseeded = run_dedup(src, tmp_path / "out", NO_SPLIT, home=tmp_path, seed=3)
    assert reseeded.config_digest != first.config_digest


def _edited(seed: int, n_changes: int) -> tuple[list[str], list[str]]:
    """A 120-word record and a copy with n_changes words replaced at seeded positions."""
    base = _words(seed)
    near = list(base)
    for pos in random.Random(seed).sample(range(120), n_changes):
        near[pos] = f"CHANGED{pos}"
    return base, near


def _true_jaccard(a: list[str], b: list[str]) -> float:
    """Exact 5-gram Jaccard of the two records as the stage sees them (joined chat text)."""
    sa, sb = (shingles(normalize_for_matching(_chat("x", w).joined_text()), 5) for w in (a, b))
    return len(sa & sb) / len(sa | sb)


def _estimate(a: list[str], b: list[str]) -> float:
    """The MinHash estimate of the same, as the stage computes it (128 permutations, its
    shingle hash)."""
    ma, mb = (MinHash(num_perm=128, hashfunc=shingle_hash) for _ in range(2))
    for mh, words in ((ma, a), (mb, b)):
        for g in shingles(normalize_for_matching(_chat("x", words).joined_text()), 5):
            mh.update(g)
    return ma.jaccard(mb)


def test_decisions_use_the_exact_jaccard_not_the_minhash_estimate(tmp_path: Path):
    # bench_dedup found pairs at true J 0.85-0.9 kept because the MinHash estimate (+-0.03)
    # fell under the threshold. These two pairs sit on either side of 0.8 with the estimate
    # on the wrong side, so only an exact confirmation gets both right.
    above, above_near = _edited(16, 3)
    below, below_near = _edited(943, 4)
    true_above, true_below = _true_jaccard(above, above_near), _true_jaccard(below, below_near)
    assert true_above > 0.82 and _estimate(above, above_near) < 0.8
    assert true_below < 0.78 and _estimate(below, below_near) > 0.84
    train = [_chat("above", above), _chat("below", below), _chat("above-near", above_near),
             _chat("below-near", below_near)]
    out = tmp_path / "out"
    m = run_dedup(_stage_dir(tmp_path / "in", train), out, NO_SPLIT, home=tmp_path)
    m.check()
    removed = _removed(out)
    assert set(removed) == {"above-near"} and removed["above-near"]["dup_of"] == "above"
    assert removed["above-near"]["jaccard"] == round(true_above, 4)
    assert _ids(out) == ["above", "below", "below-near"]
    grams = sketch(["a b c d e f g", "b c d e f g"], 5).grams
    assert exact_jaccard(*grams) == 2 / 3


ODD_TEXTS = ["", "  !!! ", "Hello, World!", "a b c d e", "a b c d e f", "one",
             "Ünïcode café — naïve “quotes”, ǅ İstanbul Straße x y z",
             "tabs\tand\x1fcontrol\x0bspaces it's  (parens) [1] snake_case 3.14",
             "日本語の文 と English mixed, with 数字 123 and emoji 🙂 ok"]


def test_signatures_equal_datasketch_minhash_updated_per_shingle():
    # The stage computes a batch's shingle hashes and MinHashes in numpy (tasks.dedup_sketch);
    # each must be the very signature of the textbook datasketch loop on the plain-Python
    # definitions: MinHash(hashfunc=shingle_hash).update per shingle of the normalized text.
    texts = ODD_TEXTS + [" ".join(_words(i, 60)) for i in range(3)] + ODD_TEXTS[::-1]
    recs = [("train", _chat(f"r{i}", t)) for i, t in enumerate(texts)]
    recs.append(("train", ChatSample(id="doc", text="Plain text, no reply.")))
    for (_, rec), sig in zip(recs, signatures(recs, NO_SPLIT), strict=True):
        norm = normalize_for_matching(rec.joined_text())
        grams = shingles(norm, NO_SPLIT.ngram)
        mh = MinHash(num_perm=NO_SPLIT.num_perm, hashfunc=shingle_hash)
        for g in grams:
            mh.update(g)
        assert (sig.sig == mh.hashvalues).all()
        assert sig.grams.tolist() == sorted({shingle_hash(g) for g in grams})
        assert sig.key == hashlib.blake2b(norm.encode(), digest_size=16).digest()


def test_manifest_duration_covers_the_whole_stage(tmp_path: Path):
    """duration_s times matching too, not only the write pass (the ledger showed dedup at 0 s)."""
    import time

    train = [_chat(f"r{i}", _words(100 + i)) for i in range(300)]
    src = _stage_dir(tmp_path / "in", train)
    t0 = time.monotonic()
    m = run_dedup(src, tmp_path / "out", NO_SPLIT, home=tmp_path)
    wall = time.monotonic() - t0
    # Everything but resolving the executor from the input's manifest is inside the stage.
    assert m.duration_s >= 0.8 * wall


def _prose_paragraphs(min_words: int = 30) -> list[str]:
    """Real prose: docstring paragraphs of a few standard-library modules."""
    import ast
    import re
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for name in ("argparse.py", "subprocess.py", "typing.py", "tarfile.py", "pathlib.py",
                 "logging/__init__.py", "collections/__init__.py", "dataclasses.py", "shutil.py",
                 "threading.py", "inspect.py", "functools.py", "zipfile.py", "os.py",
                 "unittest/case.py", "http/client.py", "email/message.py", "asyncio/events.py"):
        tree = ast.parse((stdlib / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                for block in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    text = " ".join(block.split())
                    if len(text.split()) >= min_words and ">>>" not in text:
                        out.append(text)
    return list(dict.fromkeys(out))


def _reference_removals(texts: list[str], cfg: DedupConfig) -> dict[int, tuple[str, int]]:
    """The stage's rule on datasketch's own objects, record by record: exact key, else
    MinHashLSH candidates (candidate floor) confirmed by the exact Jaccard of the plain-Python
    shingle hashes, the best one kept (ties: the first seen). {index: (kind, index it dups)}."""
    from datasketch import MinHashLSH

    from tasks.dedup_common import candidate_floor

    lsh = MinHashLSH(threshold=candidate_floor(cfg), num_perm=cfg.num_perm)
    exact: dict[bytes, int] = {}
    kept: dict[int, set[int]] = {}
    removed: dict[int, tuple[str, int]] = {}
    for i, text in enumerate(texts):
        norm = normalize_for_matching(text)
        key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
        hashes = {g: shingle_hash(g) for g in shingles(norm, cfg.ngram)}  # each hashed once
        grams = set(hashes.values())
        if key in exact:
            removed[i] = ("exact", exact[key])
            continue
        mh = MinHash(num_perm=cfg.num_perm, hashfunc=hashes.__getitem__)
        for g in hashes:
            mh.update(g)
        best = None
        for j in sorted(lsh.query(mh)):
            jac = len(grams & kept[j]) / len(grams | kept[j])
            if jac >= cfg.threshold and (best is None or jac > best[1]):
                best = (j, jac)
        if best is not None:
            removed[i] = ("near", best[0])
            continue
        exact[key], kept[i] = i, grams
        lsh.insert(i, mh)
    return removed


def test_engine_removes_what_the_datasketch_reference_removes_on_real_prose(tmp_path: Path):
    # Real prose with planted copies: k of the first 30 words replaced, so true Jaccards spread
    # over 0.4-1.0 and many pairs sit near the 0.8 threshold, where LSH misses depend on the
    # exact MinHash values. The stage must remove exactly the records the datasketch
    # reference removes, each naming the record the reference names.
    paras = _prose_paragraphs()
    rng = random.Random(5)
    texts = list(paras)
    for i, p in enumerate(paras):
        words = p.split()
        for k in (0, 1, 2, 3, 5, 8)[i % 6:i % 6 + 2]:
            edited = list(words)
            for pos in rng.sample(range(min(30, len(words))), k):
                edited[pos] = f"edit{pos}"
            texts.insert(rng.randrange(i + 1, len(texts) + 1), " ".join(edited).upper()
                         if k == 0 else " ".join(edited))
    recs = [_chat(f"r{i:04d}", t) for i, t in enumerate(texts)]
    ref = _reference_removals([r.joined_text() for r in recs], NO_SPLIT)
    out = tmp_path / "out"
    m = run_dedup(_stage_dir(tmp_path / "in", recs), out, NO_SPLIT, home=tmp_path).check()
    removed = _removed(out)
    assert {rid: (row["kind"], row["dup_of"]) for rid, row in removed.items()} == {
        recs[i].id: (kind, recs[j].id) for i, (kind, j) in ref.items()}
    # The sample means something: both kinds, and near pairs both sides of the threshold.
    kinds = Counter(kind for kind, _ in ref.values())
    assert kinds["exact"] >= 30 and kinds["near"] >= 60 and m.deduplicated == len(ref)
    jaccards = [row["jaccard"] for row in removed.values() if row["kind"] == "near"]
    assert min(jaccards) < 0.85 and all(j >= 0.8 for j in jaccards)


def _format1_index(path: Path) -> None:
    """A dedup-index.npz as ftflow wrote it before the format field (CRC-32 shingle hashes,
    datasketch MinHash values as uint64)."""
    np.savez_compressed(
        path, ids=np.array(["a"], dtype=object), splits=np.array(["train"], dtype=object),
        keys=np.array([b"k" * 16], dtype="S16"), grams=np.array([1, 2, 3], np.uint32),
        offsets=np.array([0, 3]), minhashes=np.zeros((1, 128), np.uint64),
        params=np.array([5, 128]), scheme=np.array("affine32"))


def test_incremental_dedup_matches_the_persisted_index_and_refuses_an_old_one(tmp_path: Path):
    first = [_chat(f"old{i}", _words(700 + i)) for i in range(6)]
    run_dedup(_stage_dir(tmp_path / "in1", first, [_chat("old-eval", _words(799))]),
              tmp_path / "run1", DedupConfig(), home=tmp_path).check()
    index = tmp_path / "run1" / INDEX_NAME
    near = _words(702)
    near[50] = "CHANGED"
    new = [_chat("copy", _words(700)), _chat("near", near), _chat("leak", _words(799)),
           _chat("fresh", _words(750))]
    m = run_dedup(_stage_dir(tmp_path / "in2", new), tmp_path / "run2", NO_SPLIT,
                  home=tmp_path, corpus=[index]).check()
    removed = _removed(tmp_path / "run2")
    assert {rid: (row["kind"], row["dup_of"]) for rid, row in removed.items()} == {
        "copy": ("exact", "old0"), "near": ("near", "old2"),
        "leak": ("eval_contamination", "old-eval")}
    assert m.info["corpus_records"] == 7 and _ids(tmp_path / "run2") == ["fresh"]
    with np.load(index) as data:
        assert int(data["format"]) == INDEX_FORMAT and str(data["scheme"]) == SCHEME

    old = tmp_path / "old" / INDEX_NAME
    old.parent.mkdir()
    _format1_index(old)
    with pytest.raises(IndexFormatError) as err:
        run_dedup(_stage_dir(tmp_path / "in3", new), tmp_path / "run3", NO_SPLIT,
                  home=tmp_path, corpus=[index, old])
    message = str(err.value)
    assert "\n" not in message and "format 1" in message and "rebuild" in message
    assert isinstance(err.value, StageOutputError)  # the CLI prints it as one error line
    assert not (tmp_path / "run3" / "manifest.json").exists()
