"""Exact and near-duplicate rows, within the training split and between it and the held-out split (leakage).

Exact: the text with case and whitespace normalised, hashed. Near: MinHash signatures over word 3-shingles, banded
for locality-sensitive hashing (Broder 1997; Leskovec et al., *Mining of Massive Datasets*, ch. 3), and a candidate
pair kept when its signatures agree on at least `threshold` of their slots (the estimated Jaccard similarity of the
two rows' shingle sets). The signatures are numpy rows of 16-bit values, 128 per row (256 bytes), so a million rows
take a quarter of a gigabyte; candidate pairs are found by sorting each band's keys, not by a dict per band.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

PERMUTATIONS = 128
BANDS = 16  # 16 bands of 8 slots: a pair at similarity 0.8 is a candidate with probability 0.95, at 0.9 with 0.9999
ROWS_PER_BAND = PERMUTATIONS // BANDS
SHINGLE = 3  # words per shingle
THRESHOLD = 0.8

_WORDS = re.compile(r"\w+", re.UNICODE)
_SPACE = re.compile(r"\s+")
_SEED = 20260207


def normalise(text: str) -> str:
    """Case folded and whitespace collapsed: what makes two rows "the same" to a reader."""
    return _SPACE.sub(" ", text.casefold()).strip()


def exact_key(text: str) -> int:
    """64 bits of BLAKE2b of the normalised text (a collision among a billion rows has odds of about 1 in 30)."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode(), digest_size=8).digest(), "little")


def shingles(text: str) -> list[str]:
    """Overlapping runs of `SHINGLE` words of the normalised text (the whole text when it is shorter)."""
    words = _WORDS.findall(text.casefold())
    if len(words) <= SHINGLE:
        return [" ".join(words)]
    return [" ".join(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)]


def _coefficients() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_SEED)
    a = rng.integers(1, 2**63, size=PERMUTATIONS, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=PERMUTATIONS, dtype=np.uint64)
    return a, b


_A, _B = _coefficients()


def signature(text: str) -> np.ndarray:
    """The row's MinHash: per permutation, the least multiply-shift hash of its shingles' CRC32s (top 16 bits)."""
    hashes = np.fromiter((zlib.crc32(s.encode()) for s in shingles(text)), dtype=np.uint64)
    with np.errstate(over="ignore"):  # multiply-shift hashing wraps modulo 2**64 on purpose
        mixed = (hashes[:, None] * _A[None, :] + _B[None, :]) >> np.uint64(32)
    return (mixed.min(axis=0) >> np.uint64(16)).astype(np.uint16)


def similarity(first: np.ndarray, second: np.ndarray) -> float:
    """The estimated Jaccard similarity of two rows' shingle sets: the share of signature slots that agree."""
    return float(np.mean(first == second))


@dataclass
class Duplicates:
    """Row `rows[i]` repeats row `of[i]`, a training row: exactly (`exact[i]`) or with estimated `similarity[i]`.
    Indices are into the rows given to `find_duplicates`, in increasing order of `rows`."""

    rows: np.ndarray
    of: np.ndarray
    exact: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def find_duplicates(
    keys: np.ndarray, signatures: np.ndarray, is_train: np.ndarray, signed: np.ndarray | None = None,
    threshold: float = THRESHOLD,
) -> Duplicates:
    """Each row that repeats a training row: exactly (same `keys`) or nearly (signatures agreeing on at least
    `threshold` of their slots). A row is paired with the first training row of its group (its most similar one, for
    near duplicates), so k copies give k-1 pairs and a held-out row is paired with the training row it repeats.
    Rows with a zero key (no text) are not compared, and only rows `signed` (with a signature: text, not an image's
    bytes) are compared for near duplicates. Memory: a few arrays of one value per row."""
    count = len(keys)
    has_text = keys != 0
    # Exact: sort by key, training rows first, then by position: each group's anchor is its first training row.
    order = np.lexsort((np.arange(count), ~is_train, keys))
    order = order[has_text[order]]
    anchors = _first_of_group(order, keys[order])
    best_of = np.full(count, -1, dtype=np.int64)
    best_similarity = np.zeros(count, dtype=np.float32)
    exact = (anchors != order) & is_train[anchors]
    best_of[order[exact]] = anchors[exact]
    best_similarity[order[exact]] = 1.0
    # Near: every row with text but those already paired as exact copies of a training row, banded.
    candidates = np.flatnonzero(has_text if signed is None else has_text & signed)
    candidates = candidates[np.isin(candidates, order[exact], invert=True)]
    for band in range(BANDS):
        band_keys = _band_keys(signatures[candidates, band * ROWS_PER_BAND : (band + 1) * ROWS_PER_BAND])
        local = np.lexsort((candidates, ~is_train[candidates], band_keys))
        rows = candidates[local]
        anchor = _first_of_group(rows, band_keys[local])
        linked = (anchor != rows) & is_train[anchor]
        rows, anchor = rows[linked], anchor[linked]
        scores = np.empty(len(rows), dtype=np.float32)
        for at in range(0, len(rows), 65536):  # in chunks: 64k pairs x 128 slots compared at a time
            part = slice(at, at + 65536)
            scores[part] = (signatures[rows[part]] == signatures[anchor[part]]).mean(axis=1)
        better = (scores >= threshold) & (scores > best_similarity[rows]) & (best_similarity[rows] < 1.0)
        best_of[rows[better]] = anchor[better]
        best_similarity[rows[better]] = scores[better]
    found = np.flatnonzero(best_of >= 0)
    return Duplicates(found, best_of[found], np.isin(found, order[exact]), np.round(best_similarity[found].astype(np.float64), 4))


def _first_of_group(rows: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """For each of `rows` (sorted by `sorted_keys`), the first row with the same key."""
    if not len(rows):
        return rows
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return np.repeat(rows[starts], np.diff(np.r_[starts, len(rows)]))


def _band_keys(slots: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a band's slots (8 x 16 bits: two 64-bit words, mixed)."""
    words = np.ascontiguousarray(slots).view(np.uint64)  # (rows, 2)
    with np.errstate(over="ignore"):
        return words[:, 0] * np.uint64(0x9E3779B97F4A7C15) ^ words[:, 1]
