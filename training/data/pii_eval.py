"""The project's own labelled Polish sentences for measuring `orlik data anonymize`.

Templates written for this project are filled with generated values whose gold spans are known:
valid PESEL, NIP, REGON and IBAN numbers (checksums computed), phone numbers in their Polish
forms, e-mail addresses, URLs and street addresses; and look-alikes that must stay untouched
(numbers with a wrong check digit, order numbers, dates, amounts, ISBNs, a street without a number).
Precision and recall per type are computed on character spans: a prediction counts only if its
span and type equal a gold span's.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from orlik.training.data import pii

_SLOT = re.compile(r"\{(\w+)\}")

TEMPLATES = [
    "Pacjent {NAME}, PESEL {PESEL}, zgłosił się na izbę przyjęć z bólem brzucha.",
    "Proszę o kontakt pod numerem {PHONE} albo mailowo: {EMAIL}.",
    "Faktura dla firmy z NIP {NIP} została wystawiona 14 marca.",
    "Spółka o numerze REGON {REGON} ma siedzibę przy {ADDRESS}.",
    "Wpłaty prosimy kierować na rachunek {IBAN}, w tytule podając numer zamówienia {NOISE}.",
    "Regulamin konkursu jest dostępny na stronie {URL}, a pytania można wysyłać na {EMAIL}.",
    "Mieszkam przy {ADDRESS}, a mój telefon to {PHONE}.",
    "W formularzu wpisano PESEL {PESEL} oraz adres {ADDRESS}.",
    "Numer identyfikacji podatkowej: {NIP}. Numer zamówienia: {NOISE}.",
    "Zadzwoń do biura: {PHONE}, czynne od 8 do 16.",
    "Szczegóły na {URL} lub w sekretariacie przy {ADDRESS}.",
    "Przelew z konta {IBAN} zaksięgowano {NOISE}.",
    "Dane kontaktowe: tel. {PHONE}, e-mail {EMAIL}, NIP {NIP}.",
    "Kod towaru {NOISE} nie jest numerem PESEL ani NIP.",
    "Sprawę prowadzi urząd przy {ADDRESS}; REGON {REGON}.",
    "Rodzic podał PESEL dziecka {PESEL} i swój numer {PHONE}.",
    "Cena wynosi {NOISE}, a dostawa trwa dwa dni.",
    "Spotkajmy się na {STREET} koło kawiarni, o {NOISE}.",
]
NAMES = ["Jan Kowalski", "Anna Nowak", "Piotr Wiśniewski", "Katarzyna Wójcik", "Tomasz Kamiński"]
STREETS = ["Marszałkowska", "Długa", "Piotrkowska", "Jana Pawła II", "3 Maja", "Grunwaldzka",
           "Mickiewicza", "Wojska Polskiego", "Kościuszki", "Świętokrzyska"]  # fmt: skip
CITIES = ["00-950 Warszawa", "90-001 Łódź", "31-042 Kraków", "80-831 Gdańsk", "50-384 Wrocław"]
DOMAINS = ["poczta.pl", "firma.com.pl", "gmail.com", "uw.edu.pl", "urzad.gov.pl"]


def _check(w: tuple[int, ...], d: list[int], mod: int) -> int:
    return sum(a * b for a, b in zip(w, d, strict=False)) % mod


def gen_pesel(r: random.Random, valid: bool = True) -> str:
    y, m, day = r.randint(1930, 2019), r.randint(1, 12), r.randint(1, 28)
    d = [int(c) for c in f"{y % 100:02d}{m + (20 if y >= 2000 else 0):02d}{day:02d}{r.randint(0, 9999):04d}"]
    c = (10 - _check((1, 3, 7, 9) * 3, d, 10)) % 10
    return "".join(map(str, d)) + str(c if valid else (c + r.randint(1, 9)) % 10)


def gen_nip(r: random.Random, valid: bool = True) -> str:
    while True:
        d = [r.randint(1, 9)] + [r.randint(0, 9) for _ in range(8)]
        c = _check((6, 5, 7, 2, 3, 4, 5, 6, 7), d, 11)
        if c != 10:
            break
    s = "".join(map(str, d)) + str(c if valid else (c + r.randint(1, 9)) % 10)
    return r.choice([s, f"{s[:3]}-{s[3:6]}-{s[6:8]}-{s[8:]}", f"{s[:3]}-{s[3:5]}-{s[5:7]}-{s[7:]}"])


def gen_regon(r: random.Random, valid: bool = True) -> str:
    d = [r.randint(1, 9)] + [r.randint(0, 9) for _ in range(7)]
    c = _check((8, 9, 2, 3, 4, 5, 6, 7), d, 11) % 10
    return "".join(map(str, d)) + str(c if valid else (c + r.randint(1, 9)) % 10)


def gen_iban(r: random.Random, valid: bool = True) -> str:
    bban = "".join(str(r.randint(0, 9)) for _ in range(24))
    check = 98 - int(bban + "252100") % 97
    if not valid:
        check = (check + r.randint(1, 90)) % 100
    d = f"{check:02d}{bban}"
    groups = " ".join(d[i : i + 4] for i in range(2, 26, 4))
    return r.choice([f"PL{d[:2]} {groups}", f"{d[:2]} {groups}", f"PL{d}"])


def gen_phone(r: random.Random) -> str:
    mob = r.choice(pii._MOBILE) + "".join(str(r.randint(0, 9)) for _ in range(7))
    land = f"{r.randint(12, 95)}" + "".join(str(r.randint(0, 9)) for _ in range(7))
    return r.choice([f"{mob[:3]} {mob[3:6]} {mob[6:]}", f"+48 {mob[:3]} {mob[3:6]} {mob[6:]}",
                     f"{mob[:3]}-{mob[3:6]}-{mob[6:]}", f"+48{mob}", mob, f"0048 {mob[:3]} {mob[3:6]} {mob[6:]}",
                     f"({land[:2]}) {land[2:5]} {land[5:7]} {land[7:]}", f"{land[:2]} {land[2:5]} {land[5:7]} {land[7:]}",
                     f"+48 {land[:2]} {land[2:5]} {land[5:7]} {land[7:]}"])  # fmt: skip


def gen_address(r: random.Random) -> str:
    prefix = r.choice(["ul.", "ul.", "al.", "pl.", "ulicy"])
    num = str(r.randint(1, 180)) + r.choice(
        ["", "", "a", "/" + str(r.randint(1, 60)), " m. " + str(r.randint(1, 40))]
    )
    city = r.choice(["", "", ", " + r.choice(CITIES)])
    return f"{prefix} {r.choice(STREETS)} {num}{city}"


def gen_noise(r: random.Random) -> str:
    """Look-alikes that are not personal data."""
    return r.choice([gen_pesel(r, valid=False), digits_(r, 11), gen_nip(r, valid=False),
                     f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(1990, 2025)}",
                     f"{r.randint(1, 9)} {r.randint(100, 999)} zł", f"ZAM/{r.randint(1000, 9999)}/2024",
                     f"978-83-{r.randint(100, 999)}-{r.randint(1000, 9999)}-{r.randint(0, 9)}",
                     gen_iban(r, valid=False), f"{r.randint(10, 23)}:{r.randint(10, 59)}"])  # fmt: skip


def digits_(r: random.Random, n: int) -> str:
    while True:
        s = "".join(str(r.randint(0, 9)) for _ in range(n))
        if not pii.pesel_ok(s):
            return s


_GEN = {"PESEL": gen_pesel, "NIP": gen_nip, "REGON": gen_regon, "IBAN": gen_iban, "PHONE": gen_phone,
        "ADDRESS": gen_address, "NOISE": gen_noise,
        "EMAIL": lambda r: f"{r.choice(['jan.kowalski', 'a.nowak', 'biuro', 'kontakt+rekrutacja', 'p_wisniewski'])}"
                           f"@{r.choice(DOMAINS)}",
        "URL": lambda r: r.choice(["https://www.", "http://", "www."]) + r.choice(["example.pl", "urzad.gov.pl",
                         "sklep.com.pl"]) + r.choice(["", "/regulamin", "/kontakt?id=12&lang=pl", "/a/b-c.html"]),
        "NAME": lambda r: r.choice(NAMES), "STREET": lambda r: "ul. " + r.choice(STREETS)}  # fmt: skip


# Written by hand, not from the templates above: [[TYPE|text]] marks gold spans. Some are hard on
# purpose (no context words, unusual forms), so the figures include the detector's real misses.
HANDWRITTEN = [
    "Kierownik budowy, p. Marek Zieliński, jest pod numerem [[PHONE|601 234 567]] do 18:00.",
    "Zgłoszenie nr 48213/2024 z dnia 12.02.2024 dotyczy lokalu przy [[ADDRESS|ul. Ogrodowej 5/12]].",
    "Numer PESEL [[PESEL|02270803624]] wpisano w rubryce 4, a w rubryce 5 numer dowodu ABC123456.",
    "Prosimy nie podawać numeru karty 4111 1111 1111 1111 w wiadomościach.",
    "Biuro rachunkowe (NIP [[NIP|7751001452]]) przyjmuje klientów w [[ADDRESS|al. Niepodległości 162]].",
    "Kontakt: [[EMAIL|sekretariat@szkola-podstawowa12.edu.pl]], fax [[PHONE|(58) 301 22 33]].",
    "Zebranie odbędzie się w sali 215 o godzinie 17:30, wstęp wolny.",
    "Wpłaty na fundusz remontowy: [[IBAN|PL 27 1140 2004 0000 3002 0135 5387]].",
    "Ceny: 129 zł za osobę, 99 zł dla dzieci, bilet rodzinny 349 zł.",
    "Więcej o projekcie przeczytasz na [[URL|https://pl.wikipedia.org/wiki/Orlik]].",
    "Spółdzielnia (REGON [[REGON|012345675]]) zarządza budynkiem przy [[ADDRESS|pl. Wolności 3]].",
    "Numer 02270803627 różni się od prawdziwego PESEL-u ostatnią cyfrą.",
    "Zadzwoń na infolinię [[PHONE|+48 22 590 75 55]] albo napisz SMS pod [[PHONE|+48600700800]].",
    "Na ulicy Długiej zamknięto dwa pasy ruchu.",
    "Adres do korespondencji: [[ADDRESS|ul. Jana III Sobieskiego 104/22, 00-764 Warszawa]].",
    "Faktura VAT nr FV/2024/03/117 na kwotę 1 845,00 zł.",
    "Paczka trafiła do paczkomatu KRA01M przy [[ADDRESS|os. Centrum C 7]].",
    "Dzwoniłem dziś z numeru [[PHONE|512 345 678]], ale nikt nie odebrał.",
    "ISBN 978-83-01-17285-4 to numer książki, nie telefon.",
    "Kod pocztowy 31-042 Kraków wpisz bez spacji.",
    "Mój adres mailowy zmienił się na [[EMAIL|k.wojcik+newsletter@poczta.onet.pl]].",
    "Konto 27 1140 2004 0000 3002 0135 5388 ma błędną sumę kontrolną.",
    "NIP 7751001453 nie przechodzi walidacji i zostaje w tekście.",
    "Stronę [[URL|www.gov.pl/web/cyfryzacja]] zaktualizowano w poniedziałek.",
    "Dyżur pełni lekarz rodzinny, telefon kontaktowy [[PHONE|586 123 456]].",
]
_MARK = re.compile(r"\[\[(\w+)\|(.+?)\]\]")


def handwritten() -> list[Example]:
    out = []
    for line in HANDWRITTEN:
        text, gold, pos = "", [], 0
        for m in _MARK.finditer(line):
            text += line[pos : m.start()]
            gold.append(pii.Span(len(text), len(text) + len(m.group(2)), m.group(1)))
            text += m.group(2)
            pos = m.end()
        out.append(Example(text + line[pos:], gold))
    return out


@dataclass
class Example:
    text: str
    gold: list[pii.Span]


def examples(n: int = 600, seed: int = 0) -> list[Example]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        tpl = r.choice(TEMPLATES)
        text, gold, pos = "", [], 0
        for m in _SLOT.finditer(tpl):
            text += tpl[pos : m.start()]
            value = _GEN[m.group(1)](r)
            if m.group(1) in pii.TYPES:
                gold.append(pii.Span(len(text), len(text) + len(value), m.group(1)))
            text += value
            pos = m.end()
        out.append(Example(text + tpl[pos:], gold))
    return out


def evaluate(exs: list[Example]) -> dict[str, Any]:
    """Per type: true positives, false positives, false negatives, precision, recall; plus misses."""
    tally = {t: {"tp": 0, "fp": 0, "fn": 0} for t in pii.TYPES}
    errors: list[dict[str, Any]] = []
    for ex in exs:
        pred, gold = set(pii.find(ex.text)), set(ex.gold)
        for s in pred & gold:
            tally[s.type]["tp"] += 1
        for s in pred - gold:
            tally[s.type]["fp"] += 1
        for s in gold - pred:
            tally[s.type]["fn"] += 1
        if pred != gold and len(errors) < 20:
            errors.append({"text": ex.text, "missed": [ex.text[s.start : s.end] + f" ({s.type})" for s in gold - pred],
                           "wrong": [ex.text[s.start : s.end] + f" ({s.type})" for s in pred - gold]})  # fmt: skip
    for t in tally.values():
        t["precision"] = round(t["tp"] / (t["tp"] + t["fp"]), 4) if t["tp"] + t["fp"] else None
        t["recall"] = round(t["tp"] / (t["tp"] + t["fn"]), 4) if t["tp"] + t["fn"] else None
    return {"sentences": len(exs), "per_type": tally, "errors": errors}
