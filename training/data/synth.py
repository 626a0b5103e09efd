"""A dirty web-like corpus made from the project's own documents, with known damage, for measuring
and testing `orlik data clean` at any size (100 MB in docs/data.md).

Each document is 6-12 sentences drawn from one language-and-domain pool of the built-in corpus, so
documents are new but read like the corpus. A seeded share of them is then damaged in the ways
clean must repair or drop, and each damage is counted, so a test can compare clean's report with
what was injected:
  exact_duplicate   a copy of an earlier document (whitespace changed)
  near_duplicate    an earlier document with one word replaced per ~60 (Jaccard of 5-grams >= 0.8)
  boilerplate       cookie banner, menu and footer lines around the text, plus a site header line
                    repeated across documents
  mojibake          UTF-8 read as Windows-1250 or Latin-1
  control           control characters and zero-width spaces sprinkled in
  fragment          two words, far below any length filter
  digits            a table of numbers (high digit ratio)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from orlik import corpus

_SENT = re.compile(r"(?<=[.!?…])\s+(?=[A-ZĄĆĘŁŃÓŚŹŻ„\"])")
DAMAGE = {"exact_duplicate": 0.05, "near_duplicate": 0.05, "boilerplate": 0.15, "mojibake": 0.04,
          "control": 0.04, "fragment": 0.03, "digits": 0.02}  # fmt: skip
BANNERS = [
    "Ta strona używa plików cookies w celu świadczenia usług zgodnie z Polityką prywatności.",
    "Akceptuję",
    "Strona główna | Wiadomości | Sport | Kultura | Kontakt",
    "Czytaj więcej »",
    "© 2024 Portal Regionalny. Wszelkie prawa zastrzeżone.",
    "This website uses cookies to improve your experience.",
    "Home | News | Sport | Contact",
]
HEADERS = [f"Portal Informacyjny Region {i} — najnowsze wiadomości z kraju i ze świata" for i in range(5)]


def sentence_pools(root: Path | None = None) -> dict[tuple[str, str], list[str]]:
    pools: dict[tuple[str, str], list[str]] = {}
    for d in corpus.documents(root=root or corpus.DATA_DIR):
        pools.setdefault((d.lang, d.domain), []).extend(s.strip() for s in _SENT.split(d.text) if s.strip())
    return pools


def _mojibake(text: str, rng: np.random.Generator) -> str:
    """UTF-8 bytes shown as Windows-1250 or Windows-1252, as a browser shows them (bytes those code
    pages leave undefined become C1 controls, ftfy's "sloppy" codecs)."""
    import ftfy.bad_codecs  # noqa: F401  (registers the sloppy-windows-* codecs)

    enc = "sloppy-windows-1250" if rng.random() < 0.5 else "sloppy-windows-1252"
    return text.encode("utf-8").decode(enc)


def _near(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    for i in rng.choice(len(words), size=max(1, len(words) // 60), replace=False):
        words[i] = "zmieniono"
    return " ".join(words)


def documents(n: int, seed: int = 0, root: Path | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, damage or "clean") for n documents."""
    rng = np.random.default_rng(seed)
    pools = sentence_pools(root)
    keys = sorted(pools)
    names, probs = list(DAMAGE), np.array(list(DAMAGE.values()))
    recent: list[str] = []
    for i in range(n):
        lang, domain = keys[rng.integers(len(keys))]
        pool = pools[(lang, domain)]
        text = " ".join(pool[j] for j in rng.choice(len(pool), size=int(rng.integers(6, 13)), replace=False))
        r = rng.random()
        damage = "clean"
        if r < probs.sum():
            damage = names[int(np.searchsorted(np.cumsum(probs), r, side="right"))]
        if damage in ("exact_duplicate", "near_duplicate") and not recent:
            damage = "clean"
        if damage == "exact_duplicate":
            text = "  " + recent[rng.integers(len(recent))].replace(". ", ".  ") + "\n"
        elif damage == "near_duplicate":
            text = _near(recent[rng.integers(len(recent))], rng)
        elif damage == "boilerplate":
            banner = [BANNERS[k] for k in rng.choice(len(BANNERS), size=3, replace=False)]
            text = "\n".join([HEADERS[i % len(HEADERS)], banner[0], text, banner[1], banner[2]])
        elif damage == "mojibake":
            text = _mojibake(text, rng)
        elif damage == "control":
            text = "\u200b".join(text[k : k + 40] for k in range(0, len(text), 40)).replace(" ", "\x07 ", 3)
        elif damage == "fragment":
            text = " ".join(text.split()[:2])
        elif damage == "digits":
            text = "\n".join(" ".join(str(int(x)) for x in rng.integers(0, 10**6, 8)) for _ in range(12))
        if damage == "clean":  # duplicates copy clean documents, which clean keeps
            recent.append(text)
            recent = recent[-2000:]
        yield {"id": f"web-{i:07d}", "lang": lang, "domain": domain, "text": text}, damage


def write(path: Path, n: int | None = None, megabytes: float | None = None, seed: int = 0) -> dict[str, int]:
    """Write n documents (or about `megabytes` of JSONL) to `path`; returns the damage counts."""
    counts: dict[str, int] = {}
    limit = int((megabytes or 0) * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        for rec, damage in documents(n if n is not None else 10**9, seed):
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            counts[damage] = counts.get(damage, 0) + 1
            if limit and size >= limit:
                break
    return counts
