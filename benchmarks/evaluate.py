"""The scoring loop: a variant's runtime over every chunk of a text, scored against the FP16
reference (compressed, or streamed beside it for exact figures)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orlik import progress
from orlik.benchmarks.reference import Chunks, Reference
from orlik.benchmarks.scoring import ChunkScores, score_exact, score_topk
from orlik.benchmarks.stats import Series, summarize
from orlik.errors import InputError

MODES = ("auto", "topk", "exact")


@dataclass
class TextScore:
    series: Series
    mode: str  # "topk" or "exact": how the KLD was computed
    seconds: float
    notes: list[str] = field(default_factory=list)


def _series(parts: list[ChunkScores]) -> Series:
    cat = {f: np.concatenate([getattr(p, f) for p in parts]) for f in ChunkScores.__dataclass_fields__}
    return Series(**cat)


def _variant_logits(rt: Any, chunks: Chunks, c: int) -> np.ndarray:
    q = rt.logits_from(chunks.tokens[c].tolist(), chunks.first)[:-1]
    if q.shape != (chunks.targets.shape[1], q.shape[1]):
        raise InputError(f"{rt.name} returned logits of shape {q.shape} for a chunk of {chunks.ctx} tokens")
    return q


def score_with_reference(rt: Any, chunks: Chunks, ref: Reference, label: str) -> TextScore:
    per = chunks.targets.shape[1]
    parts = []
    t0 = time.perf_counter()
    with progress.bar(label, total=chunks.n_chunks) as bar:
        for c in range(chunks.n_chunks):
            q = _variant_logits(rt, chunks, c)
            parts.append(score_topk(q, chunks.targets[c], ref.chunk(c, per)))
            bar.advance()
    return TextScore(_series(parts), "topk", time.perf_counter() - t0)


def score_streaming(rt: Any, base: Any, chunks: Chunks, label: str) -> TextScore:
    """Exact figures: the FP16 logits of each chunk are computed beside the variant's, never stored."""
    parts = []
    t0 = time.perf_counter()
    with progress.bar(f"{label} (exact)", total=chunks.n_chunks) as bar:
        for c in range(chunks.n_chunks):
            q = _variant_logits(rt, chunks, c)
            b = base.logits_from(chunks.tokens[c].tolist(), chunks.first)[:-1]
            parts.append(score_exact(q, b, chunks.targets[c]))
            bar.advance()
    return TextScore(_series(parts), "exact", time.perf_counter() - t0)


def check_tokenizer(rt: Any, name: str, text_name: str, text: str, ids: list[int], n_vocab: int) -> None:
    """A variant is scored on the reference's tokens, so its own tokenizer must produce them too;
    otherwise it would be fed text split in a way it never sees when it runs."""
    if rt.n_vocab != n_vocab:
        raise InputError(f"variant {name} has a vocabulary of {rt.n_vocab} tokens, the FP16 reference {n_vocab}; "
                         "it was not made from this checkpoint")  # fmt: skip
    own = rt.tokenize(text, add_bos=True)
    if own != ids:
        i = next((i for i, (a, b) in enumerate(zip(own, ids)) if a != b), min(len(own), len(ids)))
        raise InputError(
            f"variant {name} tokenizes the {text_name!r} text differently from the FP16 reference "
            f"(first difference at token {i} of {len(ids)}); its scores would not be comparable"
        )


def score_variant(rt: Any, name: str, texts: dict[str, tuple[Chunks, Reference | None]],
                  base: Callable[[], Any], mode: str, max_kld_error: float) -> dict[str, TextScore]:  # fmt: skip
    """Score one loaded variant on every text. In auto mode, a text whose top-K KLD bound exceeds
    max_kld_error × KLD is rescored exactly, so every reported KLD is within that relative error."""
    if mode not in MODES:
        raise InputError(f"unknown reference mode {mode!r}; valid: {', '.join(MODES)}")
    out: dict[str, TextScore] = {}
    for tname, (chunks, ref) in texts.items():
        label = f"{name} · {tname}"
        if mode == "exact" or ref is None:
            out[tname] = score_streaming(rt, base(), chunks, label)
            continue
        res = score_with_reference(rt, chunks, ref, label)
        if mode == "auto":
            s = summarize(res.series)
            if s["kld_error_bound"] > max_kld_error * s["kld"]:
                note = (f"{tname}: top-K KLD bound ±{s['kld_error_bound']:.2e} > {max_kld_error:g} × KLD "
                        f"{s['kld']:.2e}; rescored exactly")  # fmt: skip
                progress.info(f"[dim]{name}: {note}[/]")
                exact = score_streaming(rt, base(), chunks, label)
                exact.seconds += res.seconds
                exact.notes.append(note)
                res = exact
        out[tname] = res
    return out
