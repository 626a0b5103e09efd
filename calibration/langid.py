"""Language identification of calibration samples, and its measured accuracy on the held-out corpus.

The method is lingua (lingua-language-detector): offline character n-gram models (1- to 5-grams)
scored by naive Bayes, run here over Polish, English and the languages most often mistaken for
them (Czech, Slovak, Ukrainian, Russian) or most likely to turn up in a user's files. Restricting
the candidate set makes detection both faster and more accurate than the full 75-language model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from orlik.errors import MissingDependencyError
from orlik.sysinfo import package_version

# ISO 639-1 codes of the candidate languages; only "pl" and "en" are ever kept.
CANDIDATES = ("pl", "en", "cs", "sk", "uk", "ru", "de", "fr", "es", "it")
METHOD = "lingua-language-detector (character 1-5-gram naive Bayes), candidates: " + ", ".join(CANDIDATES)
# Detection cost is linear in length and the first few sentences decide it, so long texts are
# cut; a calibration sample is at most a few thousand characters anyway.
_MAX_CHARS = 3000
_MIN_SENTENCE_WORDS = 4


@lru_cache(maxsize=1)
def _detector() -> Any:
    try:
        from lingua import IsoCode639_1, LanguageDetectorBuilder
    except ImportError:
        raise MissingDependencyError(
            "language identification needs lingua-language-detector: pip install 'orlik[calib]'"
        ) from None
    codes = [getattr(IsoCode639_1, c.upper()) for c in CANDIDATES]
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def check() -> None:
    """Raise MissingDependencyError now, rather than after minutes of work, if lingua is absent."""
    _detector()


def version() -> str:
    return package_version("lingua-language-detector") or "not installed"


def detect(texts: Sequence[str]) -> list[str | None]:
    """ISO 639-1 code of each text's language among CANDIDATES, or None when undecidable."""
    if not texts:
        return []
    found = _detector().detect_languages_in_parallel_of([t[:_MAX_CHARS] for t in texts])
    return [None if lang is None else lang.iso_code_639_1.name.lower() for lang in found]


def _units(texts: Sequence[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    from orlik.corpus import sentences

    paragraphs, sents = [], []
    for lang, text in texts:
        for p in re.split(r"\n\s*\n", text):
            if p.strip():
                paragraphs.append((lang, p.strip()))
                sents += [(lang, s) for s in sentences(p) if len(s.split()) >= _MIN_SENTENCE_WORDS]
    return {"paragraphs": paragraphs, "sentences": sents}


def accuracy(split: str = "heldout", root: Path | None = None) -> dict[str, Any]:
    """Accuracy of `detect` on the corpus documents of one split, per paragraph and per sentence.

    Sentences shorter than four words are left out: a calibration sample is never that short.
    """
    from orlik import corpus

    return copy.deepcopy(_accuracy(split, Path(root or corpus.DATA_DIR).resolve()))


@lru_cache(maxsize=8)
def _accuracy(split: str, root: Path) -> dict[str, Any]:
    from orlik import corpus

    docs = corpus.documents(split=split, root=root)
    report: dict[str, Any] = {"method": METHOD, "lingua_version": version(), "split": split}
    for unit, items in _units([(d.lang, d.text) for d in docs]).items():
        got = detect([t for _, t in items])
        wrong = [(want, g) for (want, _), g in zip(items, got, strict=True) if g != want]
        per_lang = {}
        for lang in sorted({want for want, _ in items}):
            n = sum(1 for want, _ in items if want == lang)
            bad = sum(1 for want, _ in wrong if want == lang)
            per_lang[lang] = {"n": n, "accuracy": round((n - bad) / n, 4)}
        report[unit] = {
            "n": len(items),
            "errors": len(wrong),
            "accuracy": round(1 - len(wrong) / len(items), 4) if items else None,
            "by_lang": per_lang,
        }
    return report
