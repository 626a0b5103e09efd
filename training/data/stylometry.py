"""Stylometric features of a document, in the spirit of StyloMetrix (Bielik 7B v0.1 uses 266):
characters, punctuation, words, sentences, lexical diversity, function words, repetition, line
structure and, with morfeusz2, Polish part-of-speech rates. `features(text)` returns a fixed,
ordered dict of floats; FEATURE_NAMES lists them (>= 100).
"""

from __future__ import annotations

import math
import re
import statistics
import zlib
from collections import Counter
from functools import lru_cache
from typing import Any

PUNCT = {"period": ".", "comma": ",", "semicolon": ";", "colon": ":", "exclam": "!", "question": "?",
         "hyphen": "-", "endash": "–", "emdash": "—", "lparen": "(", "rparen": ")", "dquote": '"',
         "pl_lquote": "„", "pl_rquote": "”", "apostrophe": "'", "ellipsis": "…", "slash": "/",
         "percent": "%", "amp": "&", "at": "@", "hash": "#", "star": "*", "plus": "+", "equals": "=",
         "underscore": "_", "dollar": "$", "lt": "<", "gt": ">", "pipe": "|", "bracket": "["}  # fmt: skip
PL_FUNCTION = ["i", "w", "z", "na", "się", "nie", "do", "to", "że", "a", "o", "jak", "ale", "po", "co",
               "tak", "za", "od", "jest", "by", "przez", "dla", "oraz", "czy", "już", "może", "który",
               "także", "gdy", "tylko"]  # fmt: skip
EN_FUNCTION = ["the", "of", "and", "to", "a", "in", "is", "that", "it", "for", "on", "with", "as", "was",
               "by", "this", "are", "be", "or", "from"]  # fmt: skip
STOP = set(PL_FUNCTION) | set(EN_FUNCTION) | {
    "jego", "jej", "ich", "ten", "ta", "te", "tego", "tym", "są", "był", "była", "było", "być", "ze",
    "we", "lub", "ani", "bo", "też", "bardzo", "tu", "tam", "gdzie", "kiedy", "aby", "jeśli", "an",
    "at", "not", "but", "have", "has", "had", "were", "which", "their", "they", "he", "she"}  # fmt: skip
WORD_LEN_BINS = list(range(1, 13))
POS_GROUPS = {  # morfeusz2 (NKJP) tag prefixes -> coarse class
    "noun": ("subst", "depr", "ger"), "verb": ("fin", "praet", "impt", "imps", "inf", "bedzie", "aglt"),
    "adj": ("adj", "adja", "adjp", "adjc", "pact", "ppas"), "adv": ("adv",), "prep": ("prep",),
    "conj": ("conj", "comp"), "particle": ("qub",), "num": ("num", "numcol"),
    "pron": ("ppron12", "ppron3", "siebie"), "interj": ("interj",), "unknown": ("ign",),
    "abbrev": ("brev",), "participle": ("pcon", "pant"), "punct": ("interp",)}  # fmt: skip

_WORD = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*|\d+(?:[.,]\d+)*")
_SENT = re.compile(r"[^.!?…]+[.!?…]*")
_RUN = re.compile(r"(.)\1{3,}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _char_features(t: str) -> dict[str, float]:
    n = max(len(t), 1)
    letters = sum(map(str.isalpha, t))
    f = {"log_chars": math.log1p(len(t)), "letter_ratio": letters / n, "digit_ratio": sum(map(str.isdigit, t)) / n,
         "upper_ratio": _ratio(sum(map(str.isupper, t)), letters), "space_ratio": sum(map(str.isspace, t)) / n,
         "pl_diacritic_ratio": _ratio(sum(t.count(c) for c in "ąćęłńóśźżĄĆĘŁŃÓŚŹŻ"), letters),
         "non_ascii_ratio": sum(ord(c) > 127 for c in t) / n,
         "punct_ratio": sum(not c.isalnum() and not c.isspace() for c in t) / n,
         "char_run_ratio": sum(len(m.group()) for m in _RUN.finditer(t)) / n,
         "compress_ratio": len(zlib.compress(t.encode("utf-8"))) / max(len(t.encode("utf-8")), 1)}  # fmt: skip
    for name, ch in PUNCT.items():
        f[f"p_{name}"] = t.count(ch) / n * 100
    return f


def _word_features(words: list[str]) -> dict[str, float]:
    nw = max(len(words), 1)
    lens = [len(w) for w in words] or [0]
    low = [w.lower() for w in words]
    counts = Counter(low)
    f = {"log_words": math.log1p(len(words)), "word_len_mean": statistics.fmean(lens),
         "word_len_std": statistics.pstdev(lens), "word_len_median": statistics.median(lens),
         "word_len_max": max(lens), "capitalized_ratio": sum(w[:1].isupper() for w in words) / nw,
         "allcaps_ratio": sum(len(w) > 1 and w.isupper() for w in words) / nw,
         "numeric_word_ratio": sum(w[:1].isdigit() for w in words) / nw,
         "ttr": len(counts) / nw, "root_ttr": len(counts) / math.sqrt(nw),
         "log_ttr": _ratio(math.log(max(len(counts), 1)), math.log(max(nw, 2))),
         "hapax_ratio": sum(c == 1 for c in counts.values()) / nw,
         "dis_ratio": sum(c == 2 for c in counts.values()) / nw,
         "yule_k": 1e4 * _ratio(sum(c * c for c in counts.values()) - nw, nw * nw),
         "entropy": -sum(c / nw * math.log2(c / nw) for c in counts.values()),
         "mattr50": _mattr(low, 50), "stop_ratio": sum(w in STOP for w in low) / nw,
         "top1_share": counts.most_common(1)[0][1] / nw if counts else 0.0,
         "top1_content_share": _top_content(counts) / nw,
         "long_word_ratio": sum(x >= 13 for x in lens) / nw}  # fmt: skip
    for b in WORD_LEN_BINS:
        f[f"wlen_{b}"] = sum(x == b for x in lens) / nw
    for w in PL_FUNCTION:
        f[f"fw_pl_{w}"] = counts.get(w, 0) / nw * 100
    for w in EN_FUNCTION:
        f[f"fw_en_{w}"] = counts.get(w, 0) / nw * 100
    for k in (2, 3, 5):
        grams = Counter(tuple(low[i : i + k]) for i in range(len(low) - k + 1))
        total = max(sum(grams.values()), 1)
        f[f"dup_{k}gram_ratio"] = sum(c for c in grams.values() if c > 1) / total
    return f


def _top_content(counts: Counter[str]) -> int:
    return next((c for w, c in counts.most_common(20) if w not in STOP and len(w) > 2), 0)


def _mattr(words: list[str], w: int) -> float:
    if len(words) <= w:
        return len(set(words)) / max(len(words), 1)
    step = max(1, (len(words) - w) // 20)
    return statistics.fmean(len(set(words[i : i + w])) / w for i in range(0, len(words) - w + 1, step))


def _sentence_features(t: str) -> dict[str, float]:
    sents = [s.strip() for s in _SENT.findall(t) if s.strip()]
    lens = [len(_WORD.findall(s)) for s in sents] or [0]
    ns = max(len(sents), 1)
    return {"log_sentences": math.log1p(len(sents)), "sent_len_mean": statistics.fmean(lens),
            "sent_len_std": statistics.pstdev(lens), "sent_len_max": max(lens), "sent_len_min": min(lens),
            "sent_short_ratio": sum(x < 5 for x in lens) / ns, "sent_long_ratio": sum(x > 40 for x in lens) / ns,
            "sent_upper_start": sum(s[:1].isupper() for s in sents) / ns,
            "sent_end_period": sum(s.endswith(".") for s in sents) / ns,
            "sent_end_exclam": sum(s.endswith("!") for s in sents) / ns,
            "sent_end_question": sum(s.endswith("?") for s in sents) / ns,
            "sent_unterminated": sum(not s.endswith((".", "!", "?", "…")) for s in sents) / ns,
            "text_ends_terminated": float(t.rstrip().endswith((".", "!", "?", "…", '"', "”", ")")))}  # fmt: skip


def _line_features(t: str) -> dict[str, float]:
    lines = t.split("\n")
    ne = [ln for ln in lines if ln.strip()] or [""]
    lens = [len(ln) for ln in ne]
    n = len(ne)
    return {"log_lines": math.log1p(len(ne)), "line_len_mean": statistics.fmean(lens),
            "line_len_std": statistics.pstdev(lens), "empty_line_ratio": _ratio(len(lines) - len(ne), len(lines)),
            "short_line_ratio": sum(x < 30 for x in lens) / n,
            "line_end_punct": sum(ln.rstrip().endswith((".", "!", "?", ":", "…")) for ln in ne) / n,
            "bullet_line_ratio": sum(bool(re.match(r"\s*([-*•]|\d+[.)])\s", ln)) for ln in ne) / n,
            "allcaps_line_ratio": sum(ln.isupper() for ln in ne) / n,
            "dup_line_ratio": 1 - len(set(ne)) / n}  # fmt: skip


@lru_cache(maxsize=1)
def _morfeusz() -> Any:
    try:
        import morfeusz2
    except ImportError:
        return None
    return morfeusz2.Morfeusz(expand_tags=False)


def pos_available() -> bool:
    return _morfeusz() is not None


def _pos_features(t: str) -> dict[str, float]:
    """Share of tokens per coarse class, from the first morfeusz2 reading of each token span."""
    f = {f"pos_{g}": 0.0 for g in POS_GROUPS}
    m = _morfeusz()
    if m is None:
        return f
    seen: dict[tuple[int, int], str] = {}
    for start, end, (_, _, tag, *_rest) in m.analyse(t[:20_000]):
        seen.setdefault((start, end), tag.split(":", 1)[0])
    total = max(len(seen), 1)
    for cls in seen.values():
        for g, prefixes in POS_GROUPS.items():
            if cls in prefixes:
                f[f"pos_{g}"] += 1 / total
                break
    return f


def features(text: str) -> dict[str, float]:
    words = _WORD.findall(text)
    return {**_char_features(text), **_word_features(words), **_sentence_features(text),
            **_line_features(text), **_pos_features(text)}  # fmt: skip


FEATURE_NAMES: list[str] = list(features("Ala ma kota. The cat sat on the mat.\nDruga linia!"))
