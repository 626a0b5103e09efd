"""Evaluation texts: the corpus's held-out split per language by default, or the user's files,
and a check that none of them overlaps the calibration set.

The held-out split is read through orlik.corpus, the core's corpus loader, so the benchmark
scores exactly the documents that training held out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orlik import corpus
from orlik.errors import InputError

NGRAM = 8  # words; long enough that shared phrases are copies, not common language
MAX_OVERLAP = 0.01  # share of the text's n-grams that may also occur in the calibration set


@dataclass(frozen=True)
class EvalText:
    name: str
    text: str
    source: str


def heldout_texts() -> list[EvalText]:
    out = []
    for lang in corpus.LANGS:
        text = corpus.heldout_text(lang)
        if text.strip():
            out.append(EvalText(lang, text, f"orlik corpus, held-out split, {lang}"))
    if not out:
        raise InputError("the corpus has no held-out documents; pass --text FILE")
    return out


def file_texts(paths: list[Path]) -> list[EvalText]:
    out = []
    names: set[str] = set()
    for p in paths:
        p = Path(p)
        text = corpus.read_utf8(p, f"--text {p}")
        if not text.strip():
            raise InputError(f"--text {p} is empty")
        if text.endswith("\n"):  # as llama-perplexity -f reads a file, so both see the same tokens
            text = text[:-1]
        name = p.stem
        while name in names or name == "all":
            name += "_"
        names.add(name)
        out.append(EvalText(name, text, str(p)))
    return out


_WORD = re.compile(r"\w+", re.UNICODE)


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def calibration_texts(path: Path) -> list[str]:
    """The "text" fields of calibration.jsonl (or of <dir>/calibration.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / "calibration.jsonl"
    if not path.is_file():
        raise InputError(f"--calib {path} does not exist")
    from orlik import corpus

    out = [rec["text"] for rec in corpus.read_jsonl(path) if isinstance(rec.get("text"), str)]
    if not out:
        raise InputError(f"{path} has no records with a 'text' field")
    return out


def check_overlap(texts: list[EvalText], calib: Path, max_fraction: float = MAX_OVERLAP) -> dict[str, Any]:
    """Share of each text's word 8-grams found in the calibration set; more than max_fraction is
    an error, because scoring a model on its calibration text overstates its quality."""
    seen: set[int] = set()
    for t in calibration_texts(calib):
        seen |= ngrams(t)
    report: dict[str, Any] = {
        "calibration": str(calib),
        "ngram": NGRAM,
        "max_fraction": max_fraction,
        "texts": {},
    }
    for t in texts:
        grams = ngrams(t.text)
        shared = len(grams & seen)
        frac = shared / len(grams) if grams else 0.0
        report["texts"][t.name] = {"ngrams": len(grams), "shared": shared, "fraction": frac}
        if frac > max_fraction:
            raise InputError(
                f"evaluation text {t.name!r} ({t.source}) shares {100 * frac:.1f}% of its {NGRAM}-word sequences "
                f"with the calibration set {calib}; evaluate on text the quantizer has not seen"
            )
    return report
