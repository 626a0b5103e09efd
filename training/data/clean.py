"""`orlik data clean`: repair, strip boilerplate, filter and deduplicate a text corpus, streaming.

Per document: mojibake repair (ftfy), control characters out, Unicode NFC; boilerplate lines out
(cookie banners, navigation, copyright footers by pattern; lines repeated across many documents,
counted in a first pass with a fixed-size count-min sketch); length and character-class filters;
exact duplicates (hash of the case- and space-folded text) and near duplicates (datasketch MinHash
of word 5-grams in datasketch's MinHashLSHBloom). Every structure is sized up front (`max_docs`),
so memory stays flat however large the input is. Each change and drop is counted in the report.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orlik import progress
from orlik.errors import InputError, MissingDependencyError
from orlik.training.data import io, patterns

THRESHOLD = 0.8  # near-duplicate Jaccard threshold on word 5-grams
NUM_PERM = 128
SHINGLE = 5
MAX_DOCS = 2_000_000  # Bloom filters and the line sketch are sized for this many documents
BLOOM_FP = 1e-6  # false-positive rate of each Bloom filter lookup
REPEAT_MIN = 10  # a line found in at least this many documents is boilerplate
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\ufffe]")
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_NOT_PLAIN = re.compile(r"[^\w\s.,;:!?'\"()\[\]/\\%&@#*+=<>-]")


@dataclass
class CleanConfig:
    field: str = "text"
    min_chars: int = 200
    max_chars: int = 200_000
    min_words: int = 30
    min_letter_ratio: float = 0.65  # letters among non-space characters
    max_digit_ratio: float = 0.15
    max_upper_ratio: float = 0.35  # upper-case among letters
    max_symbol_ratio: float = 0.05  # Unicode symbols (S*) and private-use among non-space characters
    max_dup_line_ratio: float = 0.3  # lines repeated inside the document
    repeat_min: int = REPEAT_MIN
    threshold: float = THRESHOLD
    num_perm: int = NUM_PERM
    max_docs: int = MAX_DOCS
    dedup: bool = True

    def check(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"--threshold must be between 0 and 1, not {self.threshold}")
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise InputError("--min-chars must be >= 0 and below --max-chars")
        if self.max_docs <= 0 or self.repeat_min < 2:
            raise InputError("--max-docs must be positive and --repeat-min at least 2")


@dataclass
class Stats:
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    changed: dict[str, int] = field(default_factory=dict)  # repairs: documents touched
    lines_removed: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # where the first drops were

    def count(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def drop(self, reason: str, where: str) -> None:
        self.count(self.dropped, reason)
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(where)


def _line_key(line: str) -> str:
    return _SPACE.sub(" ", line).strip().lower()


class LineSketch:
    """Count-min sketch (4 rows of 2^21 uint16 counters, 16 MiB) of lines per document."""

    ROWS, WIDTH = 4, 1 << 21

    def __init__(self) -> None:
        import numpy as np

        self.table = np.zeros((self.ROWS, self.WIDTH), dtype=np.uint16)

    def _cells(self, key: str) -> list[int]:
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest(), "little")
        return [(h >> (32 * r)) & (self.WIDTH - 1) for r in range(self.ROWS)]

    def add(self, key: str) -> None:
        for r, c in enumerate(self._cells(key)):
            if self.table[r, c] < 65535:
                self.table[r, c] += 1

    def estimate(self, key: str) -> int:
        return int(min(self.table[r, c] for r, c in enumerate(self._cells(key))))


def count_lines(path: Path, cfg: CleanConfig) -> LineSketch:
    """First pass: in how many documents each line (space- and case-folded) appears."""
    sketch = LineSketch()
    for doc in io.read_documents(path, cfg.field):
        for key in {_line_key(ln) for ln in doc.text.split("\n")}:
            if len(key) >= 10:
                sketch.add(key)
    return sketch


def repair(text: str, stats: Stats) -> str:
    """ftfy's encoding repair (quotes and ligatures kept as written), control characters, NFC."""
    import ftfy

    fixed = ftfy.fix_text(text, ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False,
                                                      fix_latin_ligatures=False, fix_character_width=False,
                                                      normalization=None, remove_control_chars=False,
                                                      explain=False))  # fmt: skip
    if fixed != text:
        stats.count(stats.changed, "mojibake_repaired")
    n_before = len(fixed)
    fixed = _CONTROL.sub("", fixed.replace("\r\n", "\n").replace("\r", "\n"))
    if len(fixed) != n_before:
        stats.count(stats.changed, "control_chars_removed")
    nfc = unicodedata.normalize("NFC", fixed)
    if nfc != fixed:
        stats.count(stats.changed, "nfc_normalized")
    return nfc


def strip_lines(text: str, sketch: LineSketch | None, cfg: CleanConfig, stats: Stats) -> str:
    kept = []
    for line in text.split("\n"):
        key = _line_key(line)
        if key and patterns.ANY.search(line):
            stats.count(stats.lines_removed, "boilerplate_pattern")
        elif sketch is not None and len(key) >= 10 and sketch.estimate(key) >= cfg.repeat_min:
            stats.count(stats.lines_removed, "repeated_across_documents")
        else:
            kept.append(line.rstrip())
    return "\n".join(kept).strip()


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """Why a (repaired, stripped) document is dropped, or None to keep it."""
    if not text:
        return "empty_after_cleaning"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if len(_WORD.findall(text)) < cfg.min_words:
        return "too_few_words"
    n = len(text) - sum(map(str.isspace, text))  # map over str methods: C speed, no per-char frame
    letters = sum(map(str.isalpha, text))
    if letters < cfg.min_letter_ratio * n:
        return "low_letter_ratio"
    if sum(map(str.isdigit, text)) > cfg.max_digit_ratio * n:
        return "high_digit_ratio"
    if sum(map(str.isupper, text)) > cfg.max_upper_ratio * max(letters, 1):
        return "high_uppercase_ratio"
    odd = _NOT_PLAIN.findall(text)  # only these few can be symbols (Unicode category S*) or private use
    if sum(unicodedata.category(c)[0] == "S" or unicodedata.category(c) == "Co" for c in odd) > (
        cfg.max_symbol_ratio * n
    ):
        return "high_symbol_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) >= 4 and 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_ratio:
        return "repeated_lines"
    return None


class Deduper:
    """Exact duplicates in one Bloom filter; near duplicates in datasketch's MinHashLSHBloom."""

    def __init__(self, cfg: CleanConfig) -> None:
        import warnings

        try:
            import pybloomfilter
            from datasketch import MinHash, MinHashLSHBloom
        except ImportError as e:
            raise MissingDependencyError(f"deduplication needs datasketch[bloom] ({e.name} is missing): "
                                         "pip install -e '.[data]'") from None  # fmt: skip
        self._empty = MinHash(num_perm=cfg.num_perm)  # copied per document: permutations drawn once
        self.exact = pybloomfilter.BloomFilter(capacity=cfg.max_docs, error_rate=BLOOM_FP)
        with warnings.catch_warnings():  # "not persisted": intended, the index lives for one run
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                self.lsh = MinHashLSHBloom(threshold=cfg.threshold, num_perm=cfg.num_perm, n=cfg.max_docs,
                                           fp=BLOOM_FP)  # fmt: skip
            except ValueError as e:  # too few bands for this threshold and permutation count
                raise InputError(f"--threshold {cfg.threshold} with --num-perm {cfg.num_perm}: {e}; "
                                 "lower the threshold or raise --num-perm") from None  # fmt: skip
        self.num_perm = cfg.num_perm
        self.params = {"bands": self.lsh.b, "rows": self.lsh.r}

    def check(self, text: str) -> str | None:
        """'exact_duplicate', 'near_duplicate' or None (and then the document is remembered)."""
        words = _WORD.findall(text.lower())
        key = int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "little")
        if key in self.exact:
            return "exact_duplicate"
        self.exact.add(key)
        grams = {" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}
        m = self._empty.copy()
        m.update_batch([g.encode("utf-8") for g in grams])
        if self.lsh.query(m):
            return "near_duplicate"
        self.lsh.insert(m)
        return None


def run(inp: Path, out: Path, cfg: CleanConfig, report: Path | None = None) -> dict[str, Any]:
    cfg.check()
    inp, out = Path(inp), Path(out)
    t0, c0 = time.perf_counter(), time.process_time()
    progress.info(f"clean: counting repeated lines in {inp}")
    sketch = count_lines(inp, cfg)
    dedup = Deduper(cfg) if cfg.dedup else None
    stats = Stats()
    total = inp.stat().st_size
    with io.AtomicJsonl(out) as w, progress.bar("clean", total=total) as bar:
        for doc in io.read_documents(inp, cfg.field):
            stats.docs_in += 1
            size = len(doc.text.encode("utf-8"))
            stats.bytes_in += size
            bar.advance(size)
            text = strip_lines(repair(doc.text, stats), sketch, cfg, stats)
            reason = filter_reason(text, cfg) or (dedup.check(text) if dedup else None)
            if reason:
                stats.drop(reason, doc.where)
                continue
            w.write({**doc.record, cfg.field: text})
            stats.docs_out += 1
            stats.bytes_out += len(text.encode("utf-8"))
        if stats.docs_in == 0:
            raise InputError(f"{inp} holds no documents")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = _report(inp, out, cfg, stats, seconds, dedup.params if dedup else None)
    result["cpu_seconds"] = round(cpu, 2)  # on a shared machine, wall time also counts waiting
    result["report"] = io.write_report(report or io.default_report_prefix(out), result, _markdown(result))
    return result


def _report(inp: Path, out: Path, cfg: CleanConfig, stats: Stats, seconds: float,
            lsh: dict[str, int] | None) -> dict[str, Any]:  # fmt: skip
    return {
        "input": str(inp), "output": str(out), "config": asdict(cfg), "lsh": lsh,
        "docs_in": stats.docs_in, "docs_out": stats.docs_out, "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out, "changed_docs": stats.changed, "lines_removed": stats.lines_removed,
        "dropped": dict(sorted(stats.dropped.items(), key=lambda kv: -kv[1])), "drop_examples": stats.examples,
        "seconds": round(seconds, 2), "mb_per_s": round(stats.bytes_in / 1e6 / max(seconds, 1e-9), 2),
    }  # fmt: skip


def _markdown(r: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:,} | {', '.join(r['drop_examples'].get(k, []))} |" for k, v in r["dropped"].items()]
    lines = [
        f"# orlik data clean: {Path(r['input']).name}", "",
        f"{r['docs_in']:,} documents in ({r['bytes_in'] / 1e6:.2f} MB), {r['docs_out']:,} kept "
        f"({r['bytes_out'] / 1e6:.2f} MB), in {r['seconds']} s ({r['mb_per_s']} MB/s).", "",
        "## Dropped documents", "", "| reason | documents | first examples |", "|---|---:|---|", *rows, "",
        "## Repairs (documents changed)", "", "| repair | documents |", "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in r["changed_docs"].items()], "",
        "## Lines removed", "", "| why | lines |", "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in r["lines_removed"].items()], "",
        f"Near duplicates: Jaccard >= {r['config']['threshold']} on word {SHINGLE}-grams, "
        f"{r['config']['num_perm']} permutations, LSH {r['lsh']}.", "",
    ]  # fmt: skip
    return "\n".join(lines)
