"""Hand-written Polish phrases that benchmarks/tasks/generate.py combines into the task items.

The phrases live in lexicon.json beside this module (package data); this module names them.
Reviews are written in the first person plural and headlines and entity sentences in the present
tense, so that no phrase has to agree in gender with what it is combined with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DATA: dict[str, Any] = json.loads((Path(__file__).parent / "lexicon.json").read_text(encoding="utf-8"))

# Sentiment: domain -> (positive aspects, negative aspects, neutral facts); review openers by label.
REVIEWS: dict[str, tuple[list[str], list[str], list[str]]] = {
    d: (v[0], v[1], v[2]) for d, v in _DATA["REVIEWS"].items()
}
OPENERS: dict[str, list[str]] = _DATA["OPENERS"]
# Named entities: class -> names. In the sentence frames {e} stands in the nominative (persons,
# organizations, places) or after a preposition that leaves a date's form unchanged; the frames of a
# class fit that class only.
PERSONS: list[str] = _DATA["PERSONS"]
ORGANIZATIONS: list[str] = _DATA["ORGANIZATIONS"]
PLACES: list[str] = _DATA["PLACES"]
DATES: list[str] = _DATA["DATES"]
NER_FRAMES: dict[str, list[str]] = _DATA["NER_FRAMES"]
# Headline topics: topic -> frames, and the slots the frames name.
TOPIC_FRAMES: dict[str, list[str]] = _DATA["TOPIC_FRAMES"]
TOPIC_SLOTS: dict[str, list[str]] = _DATA["TOPIC_SLOTS"]
# Passages (yes/no, reading): invented villages as (nominative, locative); people as (name,
# feminine?); school subjects after "uczy" (genitive); pets as (nominative, accusative).
TOWNS: list[tuple[str, str]] = [(a, b) for a, b in _DATA["TOWNS"]]
PEOPLE: list[tuple[str, bool]] = [(a, b) for a, b in _DATA["PEOPLE"]]
SUBJECTS: list[str] = _DATA["SUBJECTS"]
MATERIALS: list[str] = _DATA["MATERIALS"]
OCCUPATIONS: list[str] = _DATA["OCCUPATIONS"]
HOBBIES: list[str] = _DATA["HOBBIES"]
PETS: list[tuple[str, str]] = [(a, b) for a, b in _DATA["PETS"]]
