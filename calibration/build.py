"""`orlik calibrate build`: mix corpus, user, chat and parallel text into one Polish-leaning
calibration set of an exact token budget, filtered for language, duplicates and held-out overlap."""

from __future__ import annotations

import errno
import heapq
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orlik import corpus, owner, paths, progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, OutputError
from orlik.fsutil import check_writable

from . import card as cardmod
from . import dedup, langid
from .sources import (
    Sample,
    TokenCounter,
    UserFile,
    chat_samples,
    corpus_samples,
    heldout_texts,
    load_files,
    parallel_samples,
    user_samples,
)

LANG_MODES = ("pl", "en", "mixed")
OUTPUT_FILES = ("calibration.jsonl", "card.json", "card.md")
MIN_TOKENS = 8  # shorter samples carry no context worth calibrating on
TOKENS = 60_000  # a set's default size, counted with the model's tokenizer
PL_RATIO = 0.7  # Polish share of a mixed set's tokens
MAX_SAMPLE_TOKENS = 512  # longer texts are cut into chunks of this many tokens
_EXAMPLES = 5
KIND = "calibration"  # what orlik's mark says made the folder
_BATCH = 256


def build(
    model: Path,
    out: Path | None = None,
    *,
    tokens: int = TOKENS,
    pl_ratio: float = PL_RATIO,
    seed: int = 0,
    lang: str = "mixed",
    user_files: Sequence[Path] = (),
    include_corpus: bool = True,
    include_chat: bool = True,
    include_parallel: bool = True,
    max_sample_tokens: int = MAX_SAMPLE_TOKENS,
    near_dup_threshold: float = 0.8,
    corpus_root: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build `<out>/calibration.jsonl`, `card.json` and `card.md`; returns the card.

    User files come first: they fill their language's budget before the built-in corpus does.
    Within each tier, domains are balanced by tokens. The result is the same for the same seed.
    """
    _validate(tokens, pl_ratio, lang, max_sample_tokens, near_dup_threshold)
    model = Path(model)
    out = Path(out) if out is not None else paths.calib_dir(model)
    _check_out(out, force)  # before any slow step
    root = Path(corpus_root or corpus.DATA_DIR)
    files = load_files(list(user_files))  # fail on bad input before any slow step
    langid.check()
    ckpt = Checkpoint.open(model)
    langs = ("pl", "en") if lang == "mixed" else (lang,)
    targets = _targets(tokens, pl_ratio, lang)

    progress.info(f"calibrate: tokenizer of {model}")
    tokenizer = ckpt.load_tokenizer()
    count = TokenCounter(tokenizer)
    candidates, sources, notes = _gather(
        root, langs, files, ckpt, tokenizer, count, max_sample_tokens,
        include_corpus=include_corpus, include_chat=include_chat, include_parallel=include_parallel,
    )  # fmt: skip
    heldout = dedup.HeldoutIndex(heldout_texts(root))
    pool, drops, examples = _filtered(candidates, langs, heldout, near_dup_threshold, lang, notes)
    available = {lg: sum(s.tokens for s in pool if s.lang == lg) for lg in langs}
    _check_budget(available, targets, tokens, pl_ratio, lang)
    chosen = _choose(pool, targets, seed, count, notes)
    data = "".join(json.dumps(_record(s), ensure_ascii=False) + "\n" for s in chosen).encode("utf-8")
    card = cardmod.make(
        chosen, data, model=_model_facts(model, ckpt, tokenizer),
        request={"tokens": tokens, "pl_ratio": pl_ratio, "lang": lang, "seed": seed,
                 "max_sample_tokens": max_sample_tokens, "token_count": "model tokenizer, no BOS/EOS"},
        sources=sources, available=available, filters=_filters(root, near_dup_threshold, heldout),
        drops=drops, drop_examples=examples, notes=notes,
    )  # fmt: skip
    _write(out, data, card)
    card["out"] = str(out)
    progress.info(f"calibrate: wrote {out / 'calibration.jsonl'} ({card['result']['tokens']} tokens)")
    return card


def _filtered(candidates: list[Any], langs: tuple[str, ...], heldout: dedup.HeldoutIndex, threshold: float,
              lang: str, notes: list[str]) -> tuple[list[Any], dict[str, int], dict[str, list[str]]]:  # fmt: skip
    """The candidates that pass language id, the held-out overlap check and dedup (with the drops
    and examples of each), noting in `notes` what happened to user samples; refuses an empty pool."""
    progress.info(f"calibrate: {len(candidates)} candidates; language id, held-out overlap, dedup")
    pool, drops, examples, events = _filter(candidates, langs, heldout, threshold)
    if events["assigned"]:
        notes.append(f"{events['assigned']} user samples without a 'lang' took the detected language")
    if events["skipped"]:
        notes.append(f"{events['skipped']} user samples in the other language were left out (--lang {lang})")
    if not pool:
        detail = ", ".join(f"{k} {v}" for k, v in drops.items()) or f"none in --lang {lang}"
        raise InputError(
            f"no calibration samples left after filtering ({len(candidates)} candidates; dropped: {detail})"
        )
    return pool, drops, examples


def _check_budget(available: dict[str, int], targets: dict[str, int], tokens: int, pl_ratio: float,
                  lang: str) -> None:  # fmt: skip
    """Refuse, saying what would fit, when the filtered sources hold fewer tokens than asked for."""
    if all(available.get(lg, 0) >= t for lg, t in targets.items()):
        return
    have = " and ".join(f"{available.get(lg, 0)} {lg}" for lg in ("pl", "en") if lg in targets)
    need = " + ".join(f"{t} {lg}" for lg, t in targets.items())
    ratio = f" at --pl-ratio {pl_ratio}" if lang == "mixed" else f" of --lang {lang}"
    most = min(int(available.get(lg, 0) * tokens / t) for lg, t in targets.items())
    hint = "lower --tokens, change --pl-ratio" if lang == "mixed" else "lower --tokens"
    hint += " or add --file"
    raise InputError(
        f"cannot build {tokens} tokens{ratio}: needs {need} tokens but the sources hold {have} "
        f"after filtering (at most {most} tokens{' at this ratio' if lang == 'mixed' else ''}); {hint}"
    )


def _choose(pool: list[Sample], targets: dict[str, int], seed: int, count: TokenCounter,
            notes: list[str]) -> list[Sample]:  # fmt: skip
    """Each language's token budget filled from the pool, shuffled; the same for the same seed."""
    rng = random.Random(seed)
    chosen: list[Sample] = []
    for lg, target in targets.items():
        picked = _select([s for s in pool if s.lang == lg], target, rng, count)
        got = sum(s.tokens for s in picked)
        if got < target - MIN_TOKENS:
            notes.append(f"{lg}: {got} of {target} tokens; no remaining sample fits the gap or can be cut")
        chosen += picked
    rng.shuffle(chosen)
    return chosen


def _model_facts(model: Path, ckpt: Checkpoint, tokenizer: Any) -> dict[str, Any]:
    return {"path": str(model), "model_type": ckpt.arch, "tokenizer_sha256": cardmod.tokenizer_hash(ckpt.path),
            "tokenizer_class": type(tokenizer).__name__}  # fmt: skip


def _filters(root: Path, near_dup_threshold: float, heldout: dedup.HeldoutIndex) -> dict[str, Any]:
    return {"langid": langid.accuracy(root=root),
            "near_duplicates": {"method": "minhash-lsh", "shingle": dedup.SHINGLE, "threshold": near_dup_threshold},
            "heldout": {"ngram": dedup.HELDOUT_NGRAM, "ngrams": len(heldout)}}  # fmt: skip


def _gather(
    root: Path,
    langs: tuple[str, ...],
    files: list[UserFile],
    ckpt: Checkpoint,
    tokenizer: Any,
    count: TokenCounter,
    max_sample_tokens: int,
    *,
    include_corpus: bool,
    include_chat: bool,
    include_parallel: bool,
) -> tuple[list[Sample], list[dict[str, Any]], list[str]]:
    """Every candidate sample, in a fixed order (user files first), with the card's source list;
    refuses when every source is off or empty."""
    notes: list[str] = []
    candidates, entries = user_samples(files, count, max_sample_tokens)
    sources: list[dict[str, Any]] = [{"kind": "user", **e} for e in entries]
    if include_corpus:
        docs = corpus_samples(root, langs, count, max_sample_tokens)
        candidates += docs
        sources.append({"kind": "corpus", "split": "train", "root": str(root), "chunks": len(docs)})
    if include_parallel:
        if (root / "parallel.jsonl").is_file():
            par = parallel_samples(root, langs, count)
            candidates += par
            sources.append({"kind": "parallel", "split": "train", "sides": len(par)})
        else:
            notes.append(f"parallel pairs skipped: {root / 'parallel.jsonl'} does not exist")
    if include_chat:
        if not ckpt.chat_template:
            notes.append("chat samples skipped: the checkpoint has no chat template")
        elif not (root / "chat.jsonl").is_file():
            notes.append(f"chat samples skipped: {root / 'chat.jsonl'} does not exist")
        else:
            chats, failed = chat_samples(root, langs, tokenizer, count)
            candidates += chats
            sources.append({"kind": "chat", "split": "train", "rendered": len(chats),
                            "template": "the checkpoint's chat template"})  # fmt: skip
            if failed:
                notes.append(f"{failed} chats could not be rendered by the checkpoint's chat template")
    if not candidates:
        raise InputError(
            "nothing to calibrate on: every source is off (--no-corpus/--no-chat/--no-parallel) "
            "and no --file was given"
        )
    return candidates, sources, notes


def _validate(tokens: int, pl_ratio: float, lang: str, max_sample_tokens: int, near: float) -> None:
    if lang not in LANG_MODES:
        raise InputError(f"unknown --lang {lang!r}; valid: {', '.join(LANG_MODES)}")
    if not isinstance(tokens, int) or tokens <= 0:
        raise InputError(f"--tokens must be a positive number of tokens, got {tokens}")
    if not 0.0 <= pl_ratio <= 1.0:
        raise InputError(f"--pl-ratio must be between 0 and 1, got {pl_ratio}")
    if max_sample_tokens < 2 * MIN_TOKENS:
        raise InputError(f"--max-sample-tokens must be at least {2 * MIN_TOKENS}, got {max_sample_tokens}")
    if not 0.0 < near <= 1.0:
        raise InputError(f"the near-duplicate threshold must be in (0, 1], got {near}")


def _targets(tokens: int, pl_ratio: float, lang: str) -> dict[str, int]:
    if lang != "mixed":
        return {lang: tokens}
    pl = round(tokens * pl_ratio)
    return {k: v for k, v in {"pl": pl, "en": tokens - pl}.items() if v > 0}


def _filter(
    candidates: list[Sample], langs: tuple[str, ...], heldout: dedup.HeldoutIndex, near_threshold: float
) -> tuple[list[Sample], dict[str, int], dict[str, list[str]], Counter[str]]:
    """Keep samples in the requested languages that are new and share nothing with held-out text.

    Returns the pool, drop counts by reason, a few example sources per reason, and the counts of
    samples kept but relabelled ("assigned") or left out for being in the other language ("skipped").
    """
    exact, near = dedup.ExactDuplicates(), dedup.NearDuplicates(near_threshold)
    drops: Counter[str] = Counter()
    events: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    pool: list[Sample] = []
    with progress.bar("filter", total=len(candidates)) as bar:
        for i in range(0, len(candidates), _BATCH):
            batch = candidates[i : i + _BATCH]
            for s, got in zip(batch, langid.detect([s.words_text for s in batch]), strict=True):
                reason = _reject(s, got, langs, heldout, exact, near)
                if reason == "skipped":
                    events["skipped"] += 1
                elif reason:
                    drops[reason] += 1
                    if len(examples[reason]) < _EXAMPLES:
                        why = f" (detected {got})" if reason == "lang_mismatch" else ""
                        examples[reason].append(s.source + why)
                else:
                    if s.lang is None:
                        events["assigned"] += 1
                        s = s.with_(lang=got)
                    pool.append(s)
            bar.advance(len(batch))
    return pool, dict(sorted(drops.items())), dict(examples), events


def _reject(
    s: Sample,
    got: str | None,
    langs: tuple[str, ...],
    heldout: dedup.HeldoutIndex,
    exact: dedup.ExactDuplicates,
    near: dedup.NearDuplicates,
) -> str | None:
    """Why `s` cannot be used (cheap checks first), "skipped" for the other language, or None."""
    if s.tokens < MIN_TOKENS:
        return "too_short"
    if got is None:
        return "lang_undetermined"
    if s.lang is not None and s.lang != got:
        return "lang_mismatch"
    if got not in ("pl", "en"):
        return "lang_other"
    if got not in langs:
        return "skipped"
    if heldout.overlaps(s.words_text):
        return "heldout_overlap"
    # Dedup last, so that a sample dropped for another reason never shadows a later copy.
    if exact.seen(s.words_text):
        return "duplicate_exact"
    if near.seen(s.words_text):
        return "duplicate_near"
    return None


def _select(pool: list[Sample], target: int, rng: random.Random, count: TokenCounter) -> list[Sample]:
    """Up to `target` tokens: user samples first, then the rest, balancing tokens across domains.

    The last gap, if any, is filled with a word-boundary prefix of a sample that did not fit.
    """
    chosen: list[Sample] = []
    leftovers: list[Sample] = []
    remaining = target
    for tier in (True, False):
        groups: dict[str, list[Sample]] = defaultdict(list)
        for s in pool:
            if (s.kind == "user") == tier:
                groups[s.domain].append(s)
        for k in sorted(groups):
            rng.shuffle(groups[k])
        heap = [(0, k) for k in sorted(groups)]
        while heap and remaining >= MIN_TOKENS:
            got, k = heapq.heappop(heap)
            queue = groups[k]
            while queue and queue[-1].tokens > remaining:
                leftovers.append(queue.pop())
            if queue:
                s = queue.pop()
                chosen.append(s)
                remaining -= s.tokens
                heapq.heappush(heap, (got + s.tokens, k))
    for s in leftovers:
        if remaining < MIN_TOKENS:
            break
        if s.truncatable:
            text, n = count.truncate(s.text, remaining)
            if n >= MIN_TOKENS:
                chosen.append(s.with_(text=text, plain=text, tokens=n, source=f"{s.source} (truncated)"))
                remaining -= n
    return chosen


def _record(s: Sample) -> dict[str, Any]:
    return {"text": s.text, "lang": s.lang, "domain": s.domain, "source": s.source, "tokens": s.tokens}


def _check_out(out: Path, force: bool) -> None:
    """`out` must be new, empty or orlik's calibration dir (or `force`); never a file or a root."""
    where = out.resolve()
    if where == Path(where.anchor):
        raise OutputError(f"--out {out} is the filesystem root; give a directory for the calibration set")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    # Only the three output files are ever replaced, but a folder of the user's is not written
    # into unasked: it may hold a calibration.jsonl of their own.
    owner.check_replaceable(out, force=force, marks=("card.json",), kind=KIND)


def _write(out: Path, data: bytes, card: dict[str, Any]) -> None:
    """Replace the three files in `out`, each through a temporary sibling and a rename; nothing else in
    `out` (an imatrix, the user's files, links) is touched. card.json goes last: it records
    calibration.jsonl's sha256, so a crash between the renames leaves a card that does not match."""
    new = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    check_writable(out)
    if new:
        owner.write_marker(out, KIND, "complete")
    texts = {"calibration.jsonl": data, "card.md": cardmod.to_markdown(card).encode("utf-8"),
             "card.json": (json.dumps(card, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}  # fmt: skip
    for name, payload in texts.items():
        _replace_file(out / name, payload)


def _replace_file(path: Path, payload: bytes) -> None:
    owner.clean_stale_files(path)
    tmp = owner.partial_name(path)
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {path}; the previous file was kept") from None
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


__all__ = ["LANG_MODES", "build"]
