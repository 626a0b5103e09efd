"""The project's own Polish-English corpus: documents, parallel pairs, chats and preference pairs.

Every record carries `lang`, `domain` and `split`; split "heldout" is never used for training or
calibration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from orlik.errors import InputError

DATA_DIR = Path(__file__).parent / "data"
LANGS = ("pl", "en")
DOMAINS = (
    "news", "science", "law", "medicine", "history",
    "technology", "cooking", "travel", "dialogue", "literature",
)  # fmt: skip
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    id: str
    lang: str
    domain: str
    split: str
    text: str


def json_records(lines: Iterable[tuple[int, str]], path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) for each non-blank (line number, line); a line that is not
    JSON is an InputError naming the file and line."""
    for i, line in lines:
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: invalid JSON: {e.msg}") from None


def parse_jsonl(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is an InputError naming the file
    and line. Lines end at "\n" only, not at every splitlines() boundary: a JSON string written with
    ensure_ascii=False may hold U+2028, U+0085 or a form feed, which are not record ends."""
    for i, rec in json_records(enumerate(text.split("\n"), 1), path):
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i}: expected a JSON object")
        yield i, rec


def read_utf8(path: Path, name: str | None = None) -> str:
    """The text of a UTF-8 file; a missing or undecodable one is an InputError naming it as `name`."""
    name = name or str(path)
    if not path.is_file():
        raise InputError(f"{name} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not UTF-8: {e}") from None


def read_jsonl_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each record of a UTF-8 JSONL file (see parse_jsonl)."""
    return list(parse_jsonl(read_utf8(path), path))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a UTF-8 JSONL file (see parse_jsonl)."""
    return [rec for _, rec in read_jsonl_lines(path)]


def _check(rec: dict[str, Any], where: str, fields: Iterable[str]) -> None:
    for f in ("id", "lang", "domain", "split", *fields):
        if not isinstance(rec.get(f), (str, list)) or not rec.get(f):
            raise InputError(f"{where}: record {rec.get('id', '?')} has no {f!r}")
    if rec["split"] not in SPLITS:
        raise InputError(f"{where}: record {rec['id']} has split {rec['split']!r}")


@lru_cache(maxsize=8)
def _documents(root: Path) -> tuple[Document, ...]:
    docs = []
    for lang in LANGS:
        for f in sorted((root / lang).glob("*.jsonl")):
            for rec in read_jsonl(f):
                _check(rec, str(f), ["text"])
                docs.append(Document(rec["id"], rec["lang"], rec["domain"], rec["split"], rec["text"]))
    if not docs:
        raise InputError(f"no corpus documents under {root}")
    return tuple(docs)


def documents(
    lang: str | None = None, split: str | None = None, domain: str | None = None, root: Path = DATA_DIR
) -> list[Document]:
    return [
        d
        for d in _documents(Path(root))
        if (lang is None or d.lang == lang)
        and (split is None or d.split == split)
        and (domain is None or d.domain == domain)
    ]


def _records(name: str, fields: list[str], split: str | None, root: Path) -> list[dict[str, Any]]:
    f = Path(root) / name
    recs = read_jsonl(f)
    for r in recs:
        _check(r, str(f), fields)
    return [r for r in recs if split is None or r["split"] == split]


def parallel(split: str | None = None, root: Path = DATA_DIR) -> list[dict[str, Any]]:
    return _records("parallel.jsonl", ["pl", "en"], split, root)


def chats(split: str | None = None, root: Path = DATA_DIR) -> list[dict[str, Any]]:
    return _records("chat.jsonl", ["messages"], split, root)


def preferences(split: str | None = None, root: Path = DATA_DIR) -> list[dict[str, Any]]:
    return _records("preferences.jsonl", ["prompt", "chosen", "rejected"], split, root)


_SENT = re.compile(r"(?<=[.!?…])\s+")


def sentences(text: str) -> list[str]:
    """Split prose into sentences on terminal punctuation; good enough for overlap checks."""
    return [s.strip() for s in _SENT.split(text) if s.strip()]


def heldout_text(lang: str, root: Path = DATA_DIR) -> str:
    """The fixed evaluation text of one language: its held-out documents, in corpus order."""
    return "\n\n".join(d.text for d in documents(lang=lang, split="heldout", root=root))


def stats(root: Path = DATA_DIR) -> dict[str, Any]:
    """Bytes and documents per language, domain and split, plus the other record counts."""
    table: dict[str, Any] = {}
    for d in documents(root=root):
        row = table.setdefault(d.lang, {}).setdefault(d.domain, {"docs": 0, "bytes": 0, "heldout_bytes": 0})
        n = len(d.text.encode("utf-8"))
        row["docs"] += 1
        row["bytes"] += n
        if d.split == "heldout":
            row["heldout_bytes"] += n
    return {
        "documents": table,
        "parallel_pairs": len(parallel(root=root)),
        "chats": len(chats(root=root)),
        "preference_pairs": len(preferences(root=root)),
    }
