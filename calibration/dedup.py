"""Duplicate and held-out-overlap filters over word n-grams.

Near duplicates are found with MinHash over word 5-gram shingles, bucketed by LSH (32 bands of 4
rows, so pairs from a Jaccard similarity of about 0.4 up become candidates) and then confirmed
with the exact Jaccard similarity of the shingle sets. Held-out overlap is exact: a sample that
shares any word 8-gram with the held-out evaluation split is refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

_WORD = re.compile(r"\w+")
SHINGLE = 5
HELDOUT_NGRAM = 8
_PERMS, _BANDS = 128, 32
_ROWS = _PERMS // _BANDS
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation, case and spacing do not make two texts differ."""
    return _WORD.findall(text.lower())


def normalized(text: str) -> str:
    return " ".join(words(text))


def ngrams(ws: list[str], n: int) -> Iterable[str]:
    return (" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1))


def _h64(s: str) -> int:
    # A keyed-free stable hash: Python's hash() changes per process and would make the result
    # depend on PYTHONHASHSEED.
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")


def shingles(text: str, n: int = SHINGLE) -> set[int]:
    ws = words(text)
    if len(ws) < n:
        return {_h64(" ".join(ws))} if ws else set()
    return {_h64(g) for g in ngrams(ws, n)}


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: one independent-looking hash function per seed. uint64 arithmetic
    # wraps, which is what the finaliser expects.
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_SEEDS = _mix(np.arange(1, _PERMS + 1, dtype=np.uint64))


def minhash(sh: set[int]) -> np.ndarray:
    values = np.fromiter(sh, dtype=np.uint64, count=len(sh))
    with np.errstate(over="ignore"):
        return _mix(values[:, None] ^ _SEEDS[None, :]).min(axis=0)


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicates:
    """Keeps the first of each group of texts whose word 5-gram Jaccard similarity >= threshold."""

    def __init__(self, threshold: float = 0.8) -> None:
        self.threshold = threshold
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(_BANDS)]
        self._sets: list[set[int]] = []

    def seen(self, text: str) -> bool:
        """True if `text` nearly duplicates one kept before; otherwise keep it and return False."""
        sh = shingles(text)
        if not sh:
            return False
        sig = minhash(sh)
        keys = [sig[b * _ROWS : (b + 1) * _ROWS].tobytes() for b in range(_BANDS)]
        candidates = {i for b, k in enumerate(keys) for i in self._buckets[b].get(k, ())}
        if any(jaccard(sh, self._sets[i]) >= self.threshold for i in sorted(candidates)):
            return True
        idx = len(self._sets)
        self._sets.append(sh)
        for b, k in enumerate(keys):
            self._buckets[b].setdefault(k, []).append(idx)
        return False


class ExactDuplicates:
    """Exact duplicates after normalisation (case, punctuation and whitespace ignored)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def seen(self, text: str) -> bool:
        key = hashlib.blake2b(normalized(text).encode("utf-8"), digest_size=16).digest()
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class HeldoutIndex:
    """Every word n-gram of the held-out texts; `overlaps` finds the first one a text shares."""

    def __init__(self, texts: Iterable[str], n: int = HELDOUT_NGRAM) -> None:
        self.n = n
        self._grams: set[int] = set()
        for t in texts:
            self._grams.update(_h64(g) for g in ngrams(words(t), n))

    def __len__(self) -> int:
        return len(self._grams)

    def overlaps(self, text: str) -> str | None:
        for g in ngrams(words(text), self.n):
            if _h64(g) in self._grams:
                return g
        return None
