"""How far apart two tokenizations of the same text are: the share of the reference's tokens that
the other tokenizer does not produce. Bench reports it per variant, quantize warns with it."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def differing_tokens(ref: Sequence[int], other: Sequence[int]) -> int:
    """How many of `ref`'s tokens are not matched, in order, by `other` (0 when they are equal)."""
    if list(ref) == list(other):
        return 0
    matcher = difflib.SequenceMatcher(None, list(ref), list(other), autojunk=False)
    return len(ref) - sum(b.size for b in matcher.get_matching_blocks())


def differing_share(ref: Sequence[int], other: Sequence[int]) -> float:
    return differing_tokens(ref, other) / max(1, len(ref))
