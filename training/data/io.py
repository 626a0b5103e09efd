"""Streaming document input and atomic JSONL output shared by `orlik data clean|anonymize|quality`.

Input is JSONL (one object per line, text under a field, default "text") or plain text (documents
separated by blank lines). Files are read line by line with strict UTF-8, so memory does not grow
with the file, and a byte that is not UTF-8 is an InputError naming the line. Output goes to a
temporary sibling and is renamed into place only when the whole input has been read.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from orlik import corpus
from orlik.errors import InputError
from orlik.fsutil import atomic_write_text, check_writable


@dataclass
class Doc:
    text: str
    record: dict[str, Any]  # the JSONL object (text field included) or {"source": "file:line"}
    where: str  # file:line, for messages


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json", ".ndjson")


def read_documents(path: Path, field: str = "text", chats: bool = False) -> Iterator[Doc]:
    """Documents of a JSONL or text file, streamed. Raises InputError on a missing file, bad UTF-8,
    a bad JSON line or a record without a string `field` (or, with `chats`, a `messages` list: the
    text is then the messages' contents); an empty file yields nothing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    with open(path, encoding="utf-8", errors="strict", newline="\n") as f:
        lines = _lines(f, path)
        yield from _jsonl(lines, path, field, chats) if is_jsonl(path) else _text(lines, path)


def _lines(f: TextIO, path: Path) -> Iterator[tuple[int, str]]:
    n = 0
    try:
        for n, line in enumerate(f, 1):
            yield n, line
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not UTF-8 near line {n + 1} ({e.reason}); convert it to UTF-8 first"
        ) from None


def _jsonl(lines: Iterator[tuple[int, str]], path: Path, field: str, chats: bool) -> Iterator[Doc]:
    for n, rec in corpus.json_records(lines, path):
        if chats and isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            said = [m.get("content") for m in rec["messages"] if isinstance(m, dict)]
            yield Doc("\n".join(x for x in said if isinstance(x, str)), rec, f"{path.name}:{n}")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            want = f"a string {field!r} field" + (" or a 'messages' list" if chats else "")
            raise InputError(f"{path}:{n}: expected a JSON object with {want}")
        yield Doc(rec[field], rec, f"{path.name}:{n}")


def _text(lines: Iterator[tuple[int, str]], path: Path) -> Iterator[Doc]:
    buf: list[str] = []
    start = 1
    for n, line in lines:
        if line.strip():
            if not buf:
                start = n
            buf.append(line.rstrip("\n"))
        elif buf:
            yield Doc("\n".join(buf), {"source": f"{path.name}:{start}"}, f"{path.name}:{start}")
            buf = []
    if buf:
        yield Doc("\n".join(buf), {"source": f"{path.name}:{start}"}, f"{path.name}:{start}")


class AtomicJsonl:
    """A JSONL file written to `.<name>.tmp-<pid>` and renamed onto `path` by commit(); an exception
    inside the `with` block removes the temporary file and leaves `path` as it was."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        check_writable(self.path.parent)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._f: TextIO | None = None
        self.records = 0
        self.bytes = 0

    def __enter__(self) -> AtomicJsonl:
        self._f = open(self.tmp, "w", encoding="utf-8", newline="\n")
        return self

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        assert self._f is not None
        self._f.write(line)
        self.records += 1
        self.bytes += len(line.encode("utf-8"))

    def __exit__(self, exc_type: object, *rest: object) -> None:
        assert self._f is not None
        try:
            if exc_type is None:
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()


def write_report(prefix: Path, report: dict[str, Any], markdown: str) -> list[str]:
    """`<prefix>.json` and `<prefix>.md`, each written atomically."""
    js, md = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    atomic_write_text(js, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(md, markdown)
    return [str(js), str(md)]


def default_report_prefix(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".report")
