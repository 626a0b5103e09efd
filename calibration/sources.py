"""Candidate calibration samples from each source: corpus documents, the user's files, chats and
parallel pairs, cut into chunks of at most `max_tokens` tokens of the model's tokenizer.

The project corpus is read through orlik.corpus, the core's loader of the corpus files and their
train/held-out split, which the training, calibration and benchmark stages all share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orlik import corpus
from orlik.errors import InputError
from orlik.fsutil import sha256_bytes

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
# Boundaries to cut long text at, coarsest first; the group keeps the separator.
_LEVELS = (
    re.compile(r"(\n[ \t]*\n\s*)"),  # paragraphs
    re.compile(r"(\n\s*)"),  # lines (dialogue turns, lists)
    re.compile(r"(?<=[.!?…])(\s+)"),  # sentences
    re.compile(r"(\s+)"),  # words
)

CountFn = Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class Sample:
    text: str  # what goes into calibration.jsonl
    lang: str | None  # declared language; None until langid assigns one (user text)
    domain: str
    source: str  # where it came from: "corpus:pl-news-003#1", "file:notes.txt:12", "chat:chat-007"
    kind: str  # corpus | user | chat | parallel
    tokens: int = 0
    plain: str = ""  # the words alone, for langid, dedup and the overlap check (no chat markup)
    truncatable: bool = True  # prose can be cut at a word; a rendered chat cannot

    @property
    def words_text(self) -> str:
        return self.plain or self.text

    def with_(self, **kw: Any) -> Sample:
        return replace(self, **kw)


class TokenCounter:
    """Counts tokens with the model's tokenizer, without BOS/EOS: samples are concatenated later."""

    def __init__(self, tokenizer: Any, batch: int = 512) -> None:
        self.tok, self.batch = tokenizer, batch

    def __call__(self, texts: list[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), self.batch):
            enc = self.tok(texts[i : i + self.batch], add_special_tokens=False, verbose=False)
            out += [len(ids) for ids in enc["input_ids"]]
        return out

    def truncate(self, text: str, limit: int) -> tuple[str, int]:
        """The longest prefix of `text` ending at a word boundary with at most `limit` tokens."""
        spans = [m.end() for m in re.finditer(r"\S+", text)]
        lo, hi, best = 0, len(spans), ("", 0)
        while lo < hi:  # binary search over the number of words kept
            mid = (lo + hi + 1) // 2
            cut = text[: spans[mid - 1]]
            n = self([cut])[0]
            if n <= limit:
                lo, best = mid, (cut, n)
            else:
                hi = mid - 1
        return best


def _split(text: str, count: CountFn, max_tokens: int, level: int = 0) -> list[tuple[str, int, str]]:
    """(piece, tokens, separator before it) in reading order, each piece at most max_tokens.

    Text is cut at the coarsest boundary that suffices: paragraphs, then lines, then sentences,
    then words. The separators are kept verbatim, so rejoining the pieces restores the text.
    """
    parts = _LEVELS[level].split(text)  # [piece, separator, piece, separator, ..., piece]
    kept = [(p, sep) for p, sep in zip(parts[0::2], ["", *parts[1::2]], strict=True) if p.strip()]
    units: list[tuple[str, int, str]] = []
    for (piece, sep), n in zip(kept, count([p for p, _ in kept]), strict=True):
        if n <= max_tokens or level == len(_LEVELS) - 1:
            units.append((piece, n, sep))
        else:
            sub = _split(piece, count, max_tokens, level + 1)
            units += [(sub[0][0], sub[0][1], sep), *sub[1:]]
    return units


def chunk(text: str, count: CountFn, max_tokens: int) -> list[str]:
    """Cut text into chunks of whole paragraphs (or lines, sentences, words) up to max_tokens."""
    chunks: list[str] = []
    cur, cur_n = "", 0
    for piece, n, sep in _split(text.strip(), count, max_tokens):
        if cur and cur_n + n > max_tokens:
            chunks.append(cur.strip())
            cur, cur_n = "", 0
        cur = f"{cur}{sep}{piece}" if cur else piece
        cur_n += n
    if cur.strip():
        chunks.append(cur.strip())
    return chunks


def _chunked(text: str, base: Sample, count: CountFn, max_tokens: int) -> Iterator[Sample]:
    parts = chunk(text, count, max_tokens)
    for i, (part, n) in enumerate(zip(parts, count(parts), strict=True)):
        src = base.source if len(parts) == 1 else f"{base.source}#{i}"
        yield base.with_(text=part, plain=part, tokens=n, source=src)


def corpus_samples(root: Path, langs: tuple[str, ...], count: CountFn, max_tokens: int) -> list[Sample]:
    out: list[Sample] = []
    for d in corpus.documents(split="train", root=root):
        if d.lang in langs:
            base = Sample("", d.lang, d.domain, f"corpus:{d.id}", "corpus")
            out += _chunked(d.text, base, count, max_tokens)
    return out


def parallel_samples(root: Path, langs: tuple[str, ...], count: CountFn) -> list[Sample]:
    """Each side of a train-split pair as its own sample: the ratio counts each language apart."""
    out = []
    for rec in corpus.parallel(split="train", root=root):
        for lang in langs:
            out.append(Sample(rec[lang], lang, rec["domain"], f"parallel:{rec['id']}:{lang}", "parallel"))
    return [s.with_(tokens=n, plain=s.text) for s, n in zip(out, count([s.text for s in out]), strict=True)]


def chat_samples(
    root: Path, langs: tuple[str, ...], tokenizer: Any, count: CountFn
) -> tuple[list[Sample], int]:
    """Train-split chats rendered through the checkpoint's chat template; returns (samples, failures)."""
    out, failed = [], 0
    for rec in corpus.chats(split="train", root=root):
        if rec["lang"] not in langs:
            continue
        try:
            text = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        except Exception:  # a template that rejects a role order (e.g. no system turn) or a key
            failed += 1
            continue
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos):  # the runtime adds BOS; counts exclude it for every sample
            text = text[len(bos) :]
        plain = "\n".join(str(m.get("content", "")) for m in rec["messages"])
        out.append(
            Sample(
                text, rec["lang"], rec["domain"], f"chat:{rec['id']}", "chat", plain=plain, truncatable=False
            )
        )
    return [s.with_(tokens=n) for s, n in zip(out, count([s.text for s in out]), strict=True)], failed


def expand_files(paths: list[Path]) -> list[Path]:
    """The user's files, with directories replaced by the .txt/.md/.jsonl files under them."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)  # .git, editor files
            )
            if not found:
                raise InputError(f"directory {p} holds no .txt, .md or .jsonl files")
            files += found
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise InputError(
                    f"{p}: unsupported file type {p.suffix or '(none)'}; use .txt, .md or .jsonl"
                )
            files.append(p)
        else:
            raise InputError(f"calibration file {p} does not exist")
    return files


def read_text(path: Path) -> tuple[str, bytes]:
    """The file's text (BOM and CRLF removed) and its raw bytes; non-UTF-8 is an InputError."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path} is not UTF-8 (invalid byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            f"convert it first, e.g. iconv -f cp1250 -t utf-8"
        ) from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    return text.replace("\r\n", "\n"), raw


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, rec in corpus.parse_jsonl(text, path):
        if not isinstance(rec.get("text"), str):
            raise InputError(f'{path}:{i}: expected an object with a "text" string')
        for key in ("lang", "domain"):
            if key in rec and not isinstance(rec[key], str):
                raise InputError(f"{path}:{i}: {key!r} must be a string")
        yield i, rec


@dataclass(frozen=True)
class UserFile:
    path: Path
    sha256: str
    texts: list[tuple[str, str | None, str, str]]  # (text, declared lang, domain, source)


def _lang_code(lang: str) -> str | None:
    """The ISO 639-1 part of a declared language: pl, PL, pl-PL and pl_PL all mean Polish."""
    return re.split(r"[-_]", lang.strip().lower())[0] or None


def load_files(paths: list[Path]) -> list[UserFile]:
    """Read and parse the user's files (and directories) up front, so bad input fails fast."""
    loaded = []
    for f in expand_files(paths):
        text, raw = read_text(f)
        if not text.strip():
            raise InputError(f"calibration file {f} is empty")
        if f.suffix in JSONL_SUFFIXES:
            texts = [
                (r["text"], _lang_code(r.get("lang", "")), r.get("domain") or "user", f"file:{f}:{i}")
                for i, r in _jsonl_records(f, text)
            ]
        else:
            texts = [(text, None, "user", f"file:{f}")]
        loaded.append(UserFile(f, sha256_bytes(raw), texts))
    return loaded


def user_samples(
    files: list[UserFile], count: CountFn, max_tokens: int
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Chunks of the user's texts, and one card entry per file (path, sha256, chunks)."""
    out: list[Sample] = []
    entries = []
    for f in files:
        n0 = len(out)
        for text, lang, domain, source in f.texts:
            out += _chunked(text, Sample("", lang, domain, source, "user"), count, max_tokens)
        entries.append({"path": str(f.path), "sha256": f.sha256, "chunks": len(out) - n0})
    return out, entries


def heldout_texts(root: Path) -> list[str]:
    """Everything in the corpus's held-out split: documents, and pairs, chats and preferences."""
    texts = [d.text for d in corpus.documents(split="heldout", root=root)]
    for name, fields in [("parallel", ("pl", "en")), ("preferences", ("prompt", "chosen", "rejected"))]:
        if (root / f"{name}.jsonl").is_file():
            for rec in getattr(corpus, name)(split="heldout", root=root):
                texts += [str(rec[k]) for k in fields]
    if (root / "chat.jsonl").is_file():
        for rec in corpus.chats(split="heldout", root=root):
            texts += [str(m.get("content", "")) for m in rec["messages"]]
    return texts
