"""Polish personal-data detectors: a pattern finds candidates, a validator (checksum, date, context)
accepts them. A number that only looks like a PESEL, NIP, REGON or IBAN fails its checksum and is
left alone.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TYPES = ("EMAIL", "URL", "IBAN", "PESEL", "NIP", "REGON", "ADDRESS", "PHONE")  # overlap priority


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str


def digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def pesel_ok(s: str) -> bool:
    d = [int(c) for c in digits(s)]
    if (
        len(d) != 11
        or (10 - sum(w * x for w, x in zip((1, 3, 7, 9) * 3, d[:10], strict=False)) % 10) % 10 != d[10]
    ):
        return False
    year, month, day = d[0] * 10 + d[1], d[2] * 10 + d[3], d[4] * 10 + d[5]
    century = {0: 1900, 20: 2000, 40: 2100, 60: 2200, 80: 1800}.get((month - 1) // 20 * 20)
    if century is None:
        return False
    try:
        datetime.date(century + year, month - (month - 1) // 20 * 20, day)
    except ValueError:
        return False
    return True


def nip_ok(s: str) -> bool:
    d = [int(c) for c in digits(s)]
    if len(d) != 10 or d[0] == 0:
        return False
    check = sum(w * x for w, x in zip((6, 5, 7, 2, 3, 4, 5, 6, 7), d, strict=False)) % 11
    return check != 10 and check == d[9]


def regon_ok(s: str) -> bool:
    d = [int(c) for c in digits(s)]
    weights = {9: (8, 9, 2, 3, 4, 5, 6, 7), 14: (2, 4, 8, 5, 0, 9, 7, 3, 6, 1, 2, 4, 8)}.get(len(d))
    if weights is None or not any(d):
        return False
    return sum(w * x for w, x in zip(weights, d, strict=False)) % 11 % 10 == d[-1]


def iban_ok(s: str) -> bool:
    """ISO 13616 mod-97 on a Polish IBAN, with or without its PL prefix (26 digits)."""
    d = digits(s)
    if len(d) != 26:
        return False
    return int(d[2:] + "2521" + d[:2]) % 97 == 1  # P=25, L=21


_B = r"(?<![\w@/.-])"  # not glued to a word, an address or a path before
_E = r"(?![\w@]|[-/.]\w)"  # nor after (a sentence's final period is fine)
# A keyword, then at most two short words ("telefon to", "numer pod"), right before the number.
_PHONE_CTX = re.compile(r"(?i)\b(tel|telefon\w*|komórk\w*|kom|zadzwo\w*|dzwo\w*|sms\w*|fax|faks\w*|pod numer\w*)"
                        r"\W{0,3}(?:\w{1,4}\W{1,3}){0,2}$")  # fmt: skip
_REGON_CTX = re.compile(r"(?i)\bregon\w*\W{0,3}(?:\w{1,4}\W{1,3}){0,2}$")
_UPPER = "A-ZĄĆĘŁŃÓŚŹŻ"

PATTERNS: dict[str, re.Pattern[str]] = {
    "EMAIL": re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-zA-Z]{2,}\b"),
    "URL": re.compile(r"(?i)\b(?:https?://|www\.)[^\s<>\"'„”]+[^\s<>\"'„”.,;:!?)\]]"),
    "IBAN": re.compile(_B + r"(?:PL\s?)?\d{2}(?:[ ]?\d{4}){6}" + _E),
    "PESEL": re.compile(_B + r"\d{11}" + _E),
    "NIP": re.compile(_B + r"(?:PL\s?)?(?:\d{10}|\d{3}-\d{3}-\d{2}-\d{2}|\d{3}-\d{2}-\d{2}-\d{3})" + _E),
    "REGON": re.compile(_B + r"(?:\d{9}|\d{14})" + _E),
    "PHONE": re.compile(
        _B
        + r"(?:(?:\+|00)48[ -]?)?(?:\d{3}[ -]\d{3}[ -]\d{3}|\(?\d{2}\)?[ -]\d{3}[ -]\d{2}[ -]\d{2}|\d{9})"
        + _E
    ),
    "ADDRESS": re.compile(
        r"\b(?:(?i:ul|al|pl|os)\.|(?i:ulic[ay]|alej[ai]|plac[u]?|osiedl[ue]))\s*"
        rf"(?:\d{{1,2}}\s+)?[{_UPPER}][\w'-]*\.?(?:\s+(?:[{_UPPER}][\w'-]*\.?|[IVX]+|i|z|nad|pod))" + r"{0,3}"
        r"\s+\d{1,4}[a-zA-Z]?(?:\s*/\s*\d{1,4}[a-zA-Z]?|\s+(?:m|lok)\.\s*\d{1,4})?"
        rf"(?:,?\s+\d{{2}}-\d{{3}}\s+[{_UPPER}][\w-]+)?"
    ),
}
_MOBILE = ("45", "50", "51", "53", "57", "60", "66", "69", "72", "73", "78", "79", "88")


def _regon_or_phone(text: str, m: re.Match[str], kind: str) -> bool:
    before = text[max(0, m.start() - 30) : m.start()]
    plain9 = re.fullmatch(r"\d{9}", m.group()) is not None
    if kind == "REGON":
        return regon_ok(m.group()) and (
            _REGON_CTX.search(before) is not None or not _PHONE_CTX.search(before)
        )
    if not plain9:
        return True  # a grouped or +48 form is a phone number
    if _REGON_CTX.search(before) and regon_ok(m.group()):
        return False
    return _PHONE_CTX.search(before) is not None or m.group()[:2] in _MOBILE


VALIDATORS: dict[str, Callable[[str, re.Match[str]], bool]] = {
    "EMAIL": lambda t, m: True,
    "URL": lambda t, m: True,
    "IBAN": lambda t, m: iban_ok(m.group()),
    "PESEL": lambda t, m: pesel_ok(m.group()),
    "NIP": lambda t, m: nip_ok(m.group()),
    "REGON": lambda t, m: _regon_or_phone(t, m, "REGON"),
    "PHONE": lambda t, m: _regon_or_phone(t, m, "PHONE"),
    "ADDRESS": lambda t, m: True,
}


def find(text: str, types: tuple[str, ...] = TYPES) -> list[Span]:
    """Accepted spans, non-overlapping: on overlap the type earlier in TYPES wins, then the longer."""
    cands: list[tuple[int, int, Span]] = []
    for prio, kind in enumerate(TYPES):
        if kind not in types:
            continue
        for m in PATTERNS[kind].finditer(text):
            if VALIDATORS[kind](text, m):
                cands.append((prio, -(m.end() - m.start()), Span(m.start(), m.end(), kind)))
    taken: list[Span] = []
    for _, _, s in sorted(cands, key=lambda c: (c[0], c[1], c[2].start)):
        if all(s.end <= t.start or s.start >= t.end for t in taken):
            taken.append(s)
    return sorted(taken, key=lambda s: s.start)


def replace(text: str, spans: list[Span]) -> str:
    out, pos = [], 0
    for s in spans:
        out += [text[pos : s.start], f"[{s.type}]"]
        pos = s.end
    return "".join([*out, text[pos:]])


def iter_types(spans: list[Span]) -> Iterator[str]:
    return (s.type for s in spans)
