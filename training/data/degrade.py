"""The labelled HIGH / MEDIUM / LOW set for the quality classifier, derived from the project's corpus.

HIGH    a corpus document as written (edited prose: news, science, law, medicine, literature, ...),
        or the assistant answers of a corpus chat.
MEDIUM  acceptable but plain text made from the same documents:
          truncated  cut mid-sentence at 20-85% of its length (a fragment, as web scrapes often are)
          flattened  lower-cased, with 50-100% of the punctuation dropped (chat- or transcript-like)
          listy      one sentence per line, as a bullet list
LOW     text a pretraining corpus should not keep:
          spam       15-60% of the sentences followed by a promotional line assembled from parts
                     (offer, price, call to action, sometimes a link or shouting)
          stuffing   a keyword phrase from the text inserted every 4-12 words (SEO keyword stuffing)
          noise      machine noise: 2-12% of the characters dropped, doubled or replaced, up to 30%
                     of the words moved (bad OCR or broken extraction)
Every degradation draws its strength per example, so the classes overlap at the edges (a 85%
truncation is nearly HIGH, a 15% spam rate nearly MEDIUM) and the classifier has real decisions.
The split follows the corpus's own: train documents and chats make the training set, held-out ones
the test set, so no test example is a variant of a training document.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from orlik import corpus

LABELS = ("high", "medium", "low")
_SENT = re.compile(r"(?<=[.!?…])\s+")
SPAM_PARTS = {
    "pl": (["Promocja", "Wyprzedaż", "Okazja dnia", "Hit cenowy", "Nowość", "Tylko dziś"],
           ["rabat do 70% na wszystko", "druga sztuka gratis", "darmowa dostawa od 49 zł",
            "zarabiaj 5000 zł tygodniowo z domu", "kredyt bez BIK w 15 minut", "najtańsze opony w sieci"],
           ["kliknij teraz", "zamów już dziś", "sprawdź koniecznie", "nie przegap", "zadzwoń teraz"],
           ["www.super-okazje24.pl", "bit.ly/xyz123", "sklep-tanio.pl/promo", ""]),
    "en": (["Sale", "Deal of the day", "Hot offer", "New", "Today only", "Clearance"],
           ["up to 70% off everything", "buy one get one free", "free shipping over $49",
            "earn $5000 a week from home", "instant loans with no credit check", "cheapest tyres online"],
           ["click now", "order today", "check it out", "don't miss it", "call now"],
           ["www.best-deals24.com", "bit.ly/xyz123", "shop-cheap.com/promo", ""]),
}  # fmt: skip


@dataclass
class Example:
    text: str
    label: str
    kind: str  # original | truncated | flattened | listy | spam | stuffing | noise
    source: str  # corpus document id
    lang: str


def _truncated(t: str, r: random.Random) -> str:
    cut = int(len(t) * r.uniform(0.2, 0.85))
    return t[:cut].rsplit(" ", 1)[0]


def _flattened(t: str, r: random.Random) -> str:
    drop = r.uniform(0.5, 1.0)
    t = re.sub(r"[,;:()„”\"'–—]", lambda m: "" if r.random() < drop else m.group(), t.lower())
    return re.sub(r"[.!?]+\s+", lambda m: " " if r.random() < drop else ". ", t)


def _listy(t: str, r: random.Random) -> str:
    return "\n".join(f"- {s.rstrip('.')}" for s in _SENT.split(t.replace("\n\n", " ")) if s.strip())


def _spam_line(r: random.Random, lang: str) -> str:
    head, offer, call, link = (r.choice(part) for part in SPAM_PARTS[lang])
    line = f"{head}: {offer}, {call} {link}".strip()
    return line.upper() + "!!!" if r.random() < 0.3 else line + r.choice(["!", "!!", "."])


def _spam(t: str, r: random.Random, lang: str) -> str:
    rate = r.uniform(0.15, 0.6)
    out = []
    for s in _SENT.split(t):
        out.append(s)
        if r.random() < rate:
            out.append(_spam_line(r, lang))
    if len(out) == len(_SENT.split(t)):
        out.insert(r.randrange(len(out) + 1), _spam_line(r, lang))
    return "\n".join(out)


def _stuffing(t: str, r: random.Random) -> str:
    words = t.split()
    content = [w.strip('.,;:!?„”"()').lower() for w in words if len(w) > 6]
    key = " ".join(r.sample(content, k=min(2, len(content)))) if content else "tanio"
    every = r.randint(4, 12)
    out = []
    for i, w in enumerate(words):
        out.append(w)
        if i % every == every - 1:
            out.append(key)
    return " ".join(out)


def _noise(t: str, r: random.Random) -> str:
    rate = r.uniform(0.02, 0.12)
    chars = list(t)
    for i in range(len(chars)):
        x = r.random()
        if x < rate / 3:
            chars[i] = ""
        elif x < 2 * rate / 3:
            chars[i] = chars[i] * 2
        elif x < rate:
            chars[i] = r.choice("0123456789#$%^&*~|\\}{")
    words = "".join(chars).split()
    for _ in range(int(len(words) * r.uniform(0.0, 0.3) / 2)):
        i, j = r.randrange(len(words)), r.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def sources(split: str) -> list[tuple[str, str, str]]:
    """(id, lang, text): the corpus documents of `split` and its chats' assistant answers (what
    `orlik data quality score` reads from a chat record), so chat data is judged like documents."""
    out = [(d.id, d.lang, d.text) for d in corpus.documents(split=split)]
    for c in corpus.chats(split=split):
        said = "\n".join(m["content"] for m in c["messages"] if m["role"] == "assistant")
        out.append((c["id"], c["lang"], said))
    return out


def examples(split: str, seed: int = 0) -> list[Example]:
    """One HIGH, three MEDIUM and three LOW examples per corpus document or chat of `split`."""
    r = random.Random(f"{seed}-{split}")
    out = []
    for doc_id, lang, t in sources(split):
        out.append(Example(t, "high", "original", doc_id, lang))
        for kind, f in (("truncated", _truncated), ("flattened", _flattened), ("listy", _listy)):
            out.append(Example(f(t, r), "medium", kind, doc_id, lang))
        for kind, text in (
            ("spam", _spam(t, r, lang)),
            ("stuffing", _stuffing(t, r)),
            ("noise", _noise(t, r)),
        ):
            out.append(Example(text, "low", kind, doc_id, lang))
    return out
