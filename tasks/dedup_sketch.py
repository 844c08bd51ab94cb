"""Stage 3's text form of a record, computed for a whole batch at once in numpy: the normalized
text's exact key, the sorted hashes of its word n-gram shingles, and its MinHash signature.

The definitions are the plain-Python ones below (normalize_for_matching, exact_key, shingles,
shingle_hash), which tests hold the batch path to record for record; `sketch` computes the same
without a Python object per word or per shingle:

- normalization: ASCII text through byte tables derived from Python's own str.lower, `\\w`
  and str.isspace (other text through the regex, then encoded);
- shingle hashes: a 64-bit polynomial hash of each shingle's UTF-8 bytes, taken from prefix
  sums over the batch's bytes, then the MurmurHash3 finalizer, top 32 bits (as CRC-32 was:
  32 bits, so no more collisions than MinHash already has);
- MinHash: datasketch's own `affine32` permutations (seed 1) applied to a batch's unique
  shingle hashes in one matrix, so a signature is bit for bit datasketch's
  `MinHash(num_perm, hashfunc=shingle_hash)` updated with every shingle;
- LSH: BandLSH cuts signatures into datasketch MinHashLSH's bands and rows for the threshold
  and pairs records that share a band exactly as it does.

SCHEME names these choices; a persisted index records it (tasks.dedup_common.save_index).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from datasketch import MinHash, MinHashLSH

SCHEME = "poly64-fmix32/datasketch-affine32"

_PUNCT = re.compile(r"[^\w\s]")


def normalize_for_matching(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: the form exact dedup compares."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def shingles(normalized: str, n: int) -> set[bytes]:
    """Word n-grams; a text shorter than n words is one shingle."""
    words = normalized.split()
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def exact_key(normalized: str) -> bytes:
    """Digest of a normalized text: records with equal keys are exact duplicates."""
    return hashlib.blake2b(normalized.encode(), digest_size=16).digest()


_M64 = (1 << 64) - 1
_P = 0x200000000367  # odd, so invertible modulo 2^64
_U64 = np.uint64


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (element-wise, wrapping)."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def shingle_hash(shingle: bytes) -> int:
    """The 32-bit hash of one shingle, one byte at a time: the definition `sketch` vectorizes,
    and a datasketch `hashfunc` (MinHash(hashfunc=shingle_hash) is the reference signature)."""
    h = 0
    for byte in shingle:
        h = (h * _P + byte) & _M64
    return int(_fmix64(np.array([h], np.uint64))[0] >> _U64(32))


# ASCII bytes as the regex path sees them: 0 dropped (punctuation), 1 word, 2 whitespace.
_CLASS = np.zeros(256, np.uint8)
_LOWER = np.arange(256, dtype=np.uint8)
for _c in range(128):
    _ch = chr(_c)
    _LOWER[_c] = ord(_ch.lower())
    _CLASS[_c] = 1 if re.fullmatch(r"\w", _ch) else 2 if _ch.isspace() else 0
_CLASS[128:] = 1  # bytes of normalized non-ASCII text (its own punctuation already gone)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i modulo 2^64 for i < n (per batch: a cache would hold 16 B per byte of the
    largest batch for the life of the process)."""
    with np.errstate(over="ignore"):
        up = np.cumprod(np.full(n, _P, np.uint64))
        down = np.cumprod(np.full(n, pow(_P, -1, 1 << 64), np.uint64))
    one = np.ones(1, np.uint64)
    return np.concatenate((one, up[:-1])), np.concatenate((one, down[:-1]))


@lru_cache(maxsize=8)
def permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutations (a, b) for num_perm, taken from datasketch itself."""
    mh = MinHash(num_perm=num_perm)
    if mh.scheme != "affine32":
        raise RuntimeError(f"datasketch's default MinHash scheme is {mh.scheme}, not affine32")
    a, b = mh.permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """datasketch's pre-mix of 32-bit hash values (MurmurHash3's 32-bit finalizer)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_matrix(grams: np.ndarray, offsets: np.ndarray, num_perm: int,
                   chunk: int = 4096) -> np.ndarray:
    """(records, num_perm) uint32 signatures: row i is datasketch's affine32 MinHash of
    grams[offsets[i]:offsets[i+1]] (every record has at least one shingle hash)."""
    a, b = permutations(num_perm)
    x = _fmix32(grams.astype(np.uint32, copy=False))
    n = len(offsets) - 1
    out = np.empty((num_perm, n), np.uint32)
    r0 = 0
    while r0 < n:  # about `chunk` hashes at a time: a (num_perm, chunk) matrix
        r1 = min(max(int(np.searchsorted(offsets, offsets[r0] + chunk, side="right")) - 1,
                     r0 + 1), n)
        block = np.multiply.outer(a, x[offsets[r0]:offsets[r1]])
        block += b[:, None]
        out[:, r0:r1] = np.minimum.reduceat(block, offsets[r0:r1] - offsets[r0], axis=1)
        r0 = r1
    return np.ascontiguousarray(out.T)


@dataclass
class Sketches:
    """The text form of a batch of records, in input order."""

    keys: list[bytes]  # blake2b-128 of each normalized text: equal keys = exact duplicates
    grams: list[np.ndarray]  # each record's sorted unique shingle hashes (uint32)
    sigs: np.ndarray  # (records, num_perm) uint32 MinHash signatures; (records, 0) if not asked


def _as_bytes(text: str) -> bytes:
    """ASCII text as is (the byte tables normalize it); other text normalized here."""
    return text.encode("ascii") if text.isascii() else normalize_for_matching(text).encode()


def sketch(texts: Sequence[str], ngram: int, num_perm: int = 0) -> Sketches:
    """Exact keys, shingle hashes and (num_perm > 0) MinHash signatures of `texts`: the same as
    normalize_for_matching -> shingles -> shingle_hash per text, as one numpy pass per batch."""
    n = len(texts)
    if n == 0:
        return Sketches([], [], np.zeros((0, num_perm), np.uint32))
    raw = [_as_bytes(t) for t in texts]
    lens = np.fromiter(map(len, raw), np.int64, n)
    buf = np.frombuffer(b"\n".join(raw), np.uint8)  # "\n": a space between records
    rec = np.repeat(np.arange(n, dtype=np.int32), lens + 1)[: buf.size]
    cls = _CLASS[buf]
    keep = cls != 0
    buf, cls, rec = _LOWER[buf[keep]], cls[keep], rec[keep]
    # Words: maximal runs of word bytes within one record.
    word = cls == 1
    same = rec[1:] == rec[:-1]
    joined = word[1:] & word[:-1] & same  # byte i+1 continues the word of byte i
    starts = np.flatnonzero(word & ~np.concatenate(([False], joined)))
    ends = np.flatnonzero(word & ~np.concatenate((joined, [False]))) + 1
    wrec = rec[starts]
    wlen = ends - starts
    # The normalized texts, back to back: each word then one space (the last one's is unused).
    wpos = np.concatenate(([0], np.cumsum(wlen + 1)))
    total = int(wpos[-1])
    src = np.repeat(starts - wpos[:-1], wlen + 1) + np.arange(total)
    norm = buf[np.minimum(src, buf.size - 1)] if buf.size else np.zeros(total, np.uint8)
    sep = wpos[1:] - 1
    norm[sep] = 0x20
    nwords = np.bincount(wrec, minlength=n)
    first = np.concatenate(([0], np.cumsum(nwords)))
    has = nwords > 0
    rstart = np.zeros(n, np.int64)
    rend = np.zeros(n, np.int64)
    rstart[has] = wpos[first[:-1][has]]
    rend[has] = sep[first[1:][has] - 1]
    data = norm.tobytes()
    keys = [hashlib.blake2b(data[s:e], digest_size=16).digest()
            for s, e in zip(rstart.tolist(), rend.tolist())]
    # Shingles: words w..w+ngram-1 of one record; a record of fewer words is one shingle.
    nw = len(starts)
    m = max(nw - ngram + 1, 0)
    last = np.arange(m) + ngram - 1
    ok = wrec[:m] == wrec[last]
    short = np.flatnonzero(nwords < ngram)
    s_start = np.concatenate((wpos[:m][ok], rstart[short]))
    s_end = np.concatenate((sep[last][ok], rend[short]))
    s_rec = np.concatenate((wrec[:m][ok], short))
    # Polynomial hash of norm[s:e]: P^(e-1) * (G[e] - G[s]), G = prefix sums of byte * P^-i.
    up, down = _powers(max(total, 1))
    with np.errstate(over="ignore"):
        prefix = np.zeros(total + 1, np.uint64)
        np.cumsum(norm.astype(np.uint64) * down[:total], out=prefix[1:])
        h = (prefix[s_end] - prefix[s_start]) * up[np.maximum(s_end - 1, 0)]
        h32 = _fmix64(h) >> _U64(32)
        both = np.sort((s_rec.astype(np.uint64) << _U64(32)) | h32)
    both = both[np.concatenate(([True], both[1:] != both[:-1]))] if both.size else both
    values = (both & _U64(0xFFFFFFFF)).astype(np.uint32)
    offsets = np.searchsorted(both >> _U64(32), np.arange(n + 1, dtype=np.uint64))
    grams = np.split(values, offsets[1:-1])
    sigs = (minhash_matrix(values, offsets, num_perm) if num_perm and n
            else np.zeros((n, num_perm), np.uint32))
    return Sketches(keys, grams, sigs)


@lru_cache(maxsize=16)
def banding(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) datasketch's MinHashLSH picks for the threshold (it integrates the
    false-positive and false-negative areas for every split: ~0.1 s, hence the cache)."""
    ref = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return ref.b, ref.r


class _Bucket(list):
    """The ids sharing one band, once there are two or more."""


_NONE = object()


class BandLSH:
    """Records that share one band of their signature are candidates: datasketch MinHashLSH's
    rule and banding (its b bands x r rows for the threshold), on exact band bytes, without a
    Python object per hash value."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.bands, self.rows = banding(threshold, num_perm)
        self._void = np.dtype((np.void, 4 * self.rows))
        self.tables: list[dict[bytes, Hashable]] = [{} for _ in range(self.bands)]

    def band_keys(self, sigs: np.ndarray) -> list[list[bytes]]:
        """Each signature's bands as bytes (sigs: (records, num_perm) uint32)."""
        used = np.ascontiguousarray(sigs[:, : self.bands * self.rows], dtype=np.uint32)
        return used.view(self._void).reshape(len(sigs), self.bands).tolist()

    def insert(self, idx: Hashable, keys: list[bytes]) -> None:
        for table, key in zip(self.tables, keys):
            hit = table.get(key, _NONE)
            if hit is _NONE:  # most bands are unique: the id itself, no list
                table[key] = idx
            elif type(hit) is _Bucket:
                hit.append(idx)
            else:
                table[key] = _Bucket((hit, idx))

    def query(self, keys: list[bytes]) -> set:
        found: set = set()
        for table, key in zip(self.tables, keys):
            hit = table.get(key, _NONE)
            if hit is _NONE:
                continue
            if type(hit) is _Bucket:
                found.update(hit)
            else:
                found.add(hit)
        return found
