"""Writes the Polish task files (<task>.jsonl beside their YAML) from the project's own lexicon.

Deterministic (one seed per task), so `python -m orlik.benchmarks.tasks.generate` rewrites the
committed files byte for byte. Each builder returns balanced, duplicate-free items; tests/
test_eval_tasks.py checks that, and that no item shares a word 8-gram with the corpus.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orlik.benchmarks.tasks import lexicon as lx

HERE = Path(__file__).parent
Item = dict[str, Any]


def _unique(make: Callable[[random.Random], tuple[str, Item]], n: int, rng: random.Random) -> list[Item]:
    """n items whose keys differ; `make` is retried until enough distinct ones are found."""
    seen: dict[str, Item] = {}
    for _ in range(n * 200):
        key, item = make(rng)
        seen.setdefault(key, item)
        if len(seen) == n:
            return list(seen.values())
    raise RuntimeError(f"the lexicon yields only {len(seen)} distinct items, not {n}")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _w(loc: str) -> str:
    """'w' + a locative, as 'we' before a w- (we Wrzosowie)."""
    return f"we {loc}" if loc[:1] in "Ww" else f"w {loc}"


# ---------------------------------------------------------------------------------------- sentiment
SENTIMENTS = ["pozytywny", "negatywny", "neutralny", "ambiwalentny"]


def _review(kind: int, rng: random.Random) -> tuple[str, Item]:
    domain = rng.choice(sorted(lx.REVIEWS))
    pos, neg, neu = lx.REVIEWS[domain]
    if kind == 0:
        parts = [rng.choice(lx.OPENERS["pos"]), *(f"{_cap(p)}." for p in rng.sample(pos, 2))]
    elif kind == 1:
        parts = [rng.choice(lx.OPENERS["neg"]), *(f"{_cap(p)}." for p in rng.sample(neg, 2))]
    elif kind == 2:
        parts = [f"{_cap(p)}." for p in rng.sample(neu, 3)]
    else:
        p, n = rng.choice(pos), rng.choice(neg)
        join = rng.choice(["{p}, ale {n}.", "{P}. Niestety {n}.", "{N}, za to {p}."])
        parts = [join.format(p=_cap(p), n=n, P=_cap(p), N=_cap(n)), rng.choice(lx.OPENERS["amb"])]
    text = " ".join(parts)
    return text, {"domain": domain, "text": text, "label": kind}


def sentiment(n_per_class: int = 50) -> list[Item]:
    rng = random.Random(18_001)
    items = [i for k in range(4) for i in _unique(lambda r, k=k: _review(k, r), n_per_class, rng)]
    rng.shuffle(items)
    return items


# ---------------------------------------------------------------------------------------- NER type
NER_TYPES = ["osoba", "organizacja", "miejsce", "data"]
_NER_NAMES = {"osoba": lx.PERSONS, "organizacja": lx.ORGANIZATIONS, "miejsce": lx.PLACES, "data": lx.DATES}


def _entity(kind: int, rng: random.Random) -> tuple[str, Item]:
    t = NER_TYPES[kind]
    e, frame = rng.choice(_NER_NAMES[t]), rng.choice(lx.NER_FRAMES[t])
    sentence = frame.format(e=e)
    return sentence, {"sentence": _cap(sentence), "entity": e, "label": kind}


def ner_type(n_per_class: int = 45) -> list[Item]:
    rng = random.Random(18_002)
    items = [i for k in range(4) for i in _unique(lambda r, k=k: _entity(k, r), n_per_class, rng)]
    rng.shuffle(items)
    return items


# ---------------------------------------------------------------------------------------- topics
TOPICS = ["film", "historia", "jedzenie", "medycyna", "motoryzacja", "praca", "sport", "technologie"]


def _headline(kind: int, rng: random.Random) -> tuple[str, Item]:
    frame = rng.choice(lx.TOPIC_FRAMES[TOPICS[kind]])
    slots = {k: rng.choice(v) for k, v in lx.TOPIC_SLOTS.items()}
    text = _cap(frame.format(**slots))
    return text, {"headline": text, "label": kind}


def topic(n_per_class: int = 24) -> list[Item]:
    rng = random.Random(18_003)
    items = [i for k in range(8) for i in _unique(lambda r, k=k: _headline(k, r), n_per_class, rng)]
    rng.shuffle(items)
    return items


# ---------------------------------------------------------------------------------------- yes / no
def _bridge(yes: bool, rng: random.Random) -> tuple[str, str]:
    (_town, loc), mat = rng.choice(lx.TOWNS), rng.choice(lx.MATERIALS)
    year, length = rng.randrange(1890, 2015), rng.randrange(40, 400, 5)
    passage = (f"{_cap(mat)} most {_w(loc)} zbudowano w {year} roku. Ma {length} metrów długości, "
               f"a od {rng.choice(['dziesięciu', 'kilku', 'dwudziestu'])} lat mogą z niego korzystać tylko piesi.")  # fmt: skip
    kind = rng.randrange(3)
    if kind == 0:
        pivot = year + rng.randrange(1, 30) if yes else year - rng.randrange(0, 30)
        return passage, f"Czy most {_w(loc)} zbudowano przed {pivot} rokiem?"
    if kind == 1:
        pivot = length - rng.randrange(5, 40, 5) if yes else length + rng.randrange(0, 40, 5)
        return passage, f"Czy most {_w(loc)} ma więcej niż {pivot} metrów długości?"
    other = mat if yes else rng.choice([m for m in lx.MATERIALS if m != mat])
    return passage, f"Czy most {_w(loc)} jest {other}?"


def _teacher(yes: bool, rng: random.Random) -> tuple[str, str]:
    (name, fem), subject = rng.choice(lx.PEOPLE), rng.choice(lx.SUBJECTS)
    (_, born), (_, lives) = rng.sample(lx.TOWNS, 2)
    year = rng.randrange(1995, 2022)
    urodzil = "urodziła" if fem else "urodził"
    passage = (
        f"{name} {urodzil} się {_w(born)}, ale od {year} roku mieszka {_w(lives)}. "
        f"Tam uczy {subject} w miejscowej szkole i prowadzi kółko szachowe."
    )
    kind = rng.randrange(3)
    if kind == 0:
        s = subject if yes else rng.choice([x for x in lx.SUBJECTS if x != subject])
        return passage, f"Czy {name} uczy {s}?"
    if kind == 1:
        where = lives if yes else born
        return passage, f"Czy {name} mieszka obecnie {_w(where)}?"
    pivot = year + rng.randrange(1, 15) if yes else year - rng.randrange(0, 15)
    return passage, f"Czy {name} mieszka {_w(lives)} od roku wcześniejszego niż {pivot}?"


def _library(yes: bool, rng: random.Random) -> tuple[str, str]:
    (_town, loc) = rng.choice(lx.TOWNS)
    opens, closes = rng.randrange(7, 11), rng.randrange(15, 20)
    saturday = rng.random() < 0.5
    sat = "w soboty działa do trzynastej" if saturday else "w soboty jest zamknięta"
    passage = (
        f"Biblioteka gminna {_w(loc)} jest czynna w dni powszednie od {opens}:00 do {closes}:00, a {sat}."
    )
    kind = rng.randrange(2)
    if kind == 0:  # the answer follows from the passage: "yes" only if it opens on Saturdays
        return passage, ("Czy bibliotekę {w} można odwiedzić w sobotę?" if saturday == yes
                         else "Czy biblioteka {w} jest zamknięta w soboty?").format(w=_w(loc))  # fmt: skip
    hour = closes - rng.randrange(1, 4) if yes else closes + rng.randrange(1, 3)
    return passage, f"Czy w dzień powszedni biblioteka {_w(loc)} jest jeszcze otwarta o {hour}:00?"


def _yesno(yes: bool, rng: random.Random) -> tuple[str, Item]:
    passage, question = rng.choice([_bridge, _teacher, _library])(yes, rng)
    return passage + question, {"passage": passage, "question": question, "label": 0 if yes else 1}


def yes_no(n_per_class: int = 90) -> list[Item]:
    rng = random.Random(18_004)
    items = [i for yes in (True, False) for i in _unique(lambda r, y=yes: _yesno(y, r), n_per_class, rng)]
    rng.shuffle(items)
    return items


# ---------------------------------------------------------------------------------------- reading
def _reading(answer_at: int, rng: random.Random) -> tuple[str, Item]:
    name, fem = rng.choice(lx.PEOPLE)
    first = name.split()[0]
    (_, home), (_, sister) = rng.sample(lx.TOWNS, 2)
    job, hobby = rng.choice(lx.OCCUPATIONS), rng.choice(lx.HOBBIES)
    pet = rng.choice(lx.PETS)
    her = "jej" if fem else "jego"
    facts = [
        f"Na co dzień {job}.",
        f"W wolnym czasie {first} {hobby}.",
        f"W {her} domu mieszka też {pet[0]}.",
    ]
    rng.shuffle(facts)
    years = rng.choice(["pięciu", "siedmiu", "dwunastu", "wielu"])
    facts.insert(0, f"{name} mieszka {_w(home)} od {years} lat.")
    sibling = "siostra" if rng.random() < 0.5 else "brat"
    passage = " ".join(facts) + f" {_cap(her)} {sibling} mieszka {_w(sister)} i {rng.choice(lx.OCCUPATIONS)}."
    kind = rng.randrange(4)
    if kind == 0:
        q, right = f"Gdzie mieszka {name}?", _w(home)
        pool = [_w(sister)] + [_w(loc) for _, loc in lx.TOWNS if loc not in (home, sister)]
    elif kind == 1:
        q, right, pool = f"Czym na co dzień zajmuje się {name}?", job, [j for j in lx.OCCUPATIONS if j != job]
    elif kind == 2:
        q, right, pool = f"Co {first} robi w wolnym czasie?", hobby, [h for h in lx.HOBBIES if h != hobby]
    else:
        q, right, pool = f"Jakie zwierzę ma w domu {name}?", pet[0], [p[0] for p in lx.PETS if p != pet]
    wrong = ([pool[0], *rng.sample(pool[1:], 2)]) if kind == 0 else rng.sample(pool, 3)
    rng.shuffle(wrong)
    choices = [*wrong[:answer_at], right, *wrong[answer_at:]]
    return passage + q, {"passage": passage, "question": q, "choices": choices, "label": answer_at}


def reading(n_per_class: int = 45) -> list[Item]:
    rng = random.Random(18_005)
    items = [i for k in range(4) for i in _unique(lambda r, k=k: _reading(k, r), n_per_class, rng)]
    rng.shuffle(items)
    return items


BUILDERS: dict[str, Callable[[], list[Item]]] = {
    "pl_sentiment": sentiment, "pl_ner_type": ner_type, "pl_topic": topic, "pl_yes_no": yes_no,
    "pl_reading": reading,
}  # fmt: skip


def write(out: Path = HERE) -> dict[str, int]:
    counts = {}
    for task, build in BUILDERS.items():
        items = [{"id": f"{task}-{i:04d}", **item} for i, item in enumerate(build())]
        text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        (out / f"{task}.jsonl").write_text(text, encoding="utf-8")
        counts[task] = len(items)
    return counts


if __name__ == "__main__":
    print(write())
