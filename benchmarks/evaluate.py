"""The scoring loops: variants' runtimes over every chunk of a text, scored against FP16.

Two ways, same figures:
- exact: FP16 and a group of variants run chunk by chunk side by side; each chunk's FP16 logits
  are computed once for the whole group, used over the full vocabulary, and dropped. Nothing is
  approximated; the compact reference is written during the same pass for later runs.
- topk: variants one at a time against the cached compact reference; the KLD is an estimate with
  an exact bound (see scoring.py).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orlik import progress
from orlik.benchmarks.reference import Chunks, Reference
from orlik.benchmarks.scoring import TopK, compress, score_exact_many, score_topk
from orlik.benchmarks.stats import Series
from orlik.errors import InputError
from orlik.tokenstats import differing_share

MODES = ("auto", "topk", "exact")


@dataclass
class TextScore:
    series: Series
    mode: str  # "topk" or "exact": how the KLD was computed
    seconds: float  # time in this variant's own forward passes and scoring
    notes: list[str] = field(default_factory=list)


def _scored_logits(rt: Any, chunks: Chunks, c: int) -> np.ndarray:
    """Logits of the scored positions ctx/2 .. ctx−2 of chunk c."""
    q = rt.logits_from(chunks.tokens[c].tolist(), chunks.first)[:-1]
    if q.ndim != 2 or q.shape[0] != chunks.targets.shape[1]:
        raise InputError(f"{rt.name} returned logits of shape {q.shape} for a chunk of {chunks.ctx} tokens")
    return q


def token_mismatch(rt: Any, name: str, text: str, ids: list[int], n_vocab: int) -> float:
    """The share of the reference's token ids that the variant's own tokenizer would not produce
    for `text` (0.0 when they agree). Every variant is scored on the reference's ids all the same,
    so a table can mix runtimes whose pre-tokenizers differ (llama.cpp merges "\n" and " " before a
    digit where a Hugging Face byte-level BPE does not); the share is reported, since a served
    model sees its own split. A different vocabulary means another checkpoint and is refused."""
    if rt.n_vocab != n_vocab:
        raise InputError(f"variant {name} has a vocabulary of {rt.n_vocab} tokens, the FP16 reference {n_vocab}; "
                         "it was not made from this checkpoint")  # fmt: skip
    return differing_share(ids, rt.tokenize(text, add_bos=True))


def score_topk_text(rt: Any, chunks: Chunks, ref: Reference, label: str) -> TextScore:
    per = chunks.targets.shape[1]
    parts = []
    t0 = time.perf_counter()
    with progress.bar(label, total=chunks.n_chunks) as bar:
        for c in range(chunks.n_chunks):
            parts.append(score_topk(_scored_logits(rt, chunks, c), chunks.targets[c], ref.chunk(c, per)))
            bar.advance()
    return TextScore(Series.concat(parts), "topk", time.perf_counter() - t0)


def score_exact_text(rts: dict[str, Any], base: Any, chunks: Chunks, label: str,
                     compress_to: tuple[int, float] | None = None,
                     overlap: bool = True) -> tuple[dict[str, TextScore], TopK | None]:  # fmt: skip
    """All of `rts` against FP16, chunk by chunk. With compress_to=(kmax, tail_mass) the FP16 rows
    are also compressed into a reference, returned for caching.

    Chunk c is scored (and compressed) in a worker thread while chunk c+1 is being computed. With
    `overlap`, FP16 also runs a chunk ahead in a thread of its own, beside the variants (see
    split_threads); without, FP16 and the variants take turns on all the threads. torch, llama.cpp
    and numpy's array loops release the GIL, so the stages share the cores. At most three chunks of
    logits are held at once.
    """
    parts: dict[str, list[Series]] = {n: [] for n in rts}
    seconds = dict.fromkeys(rts, 0.0)  # forward passes, this thread
    scoring_s = dict.fromkeys(rts, 0.0)  # scoring, the scorer's thread (kept apart: no shared +=)
    tops: list[TopK] = []

    def fp16(c: int) -> np.ndarray:
        return _scored_logits(base, chunks, c)

    def score(c: int, b: np.ndarray, qs: dict[str, np.ndarray]) -> None:
        t0 = time.perf_counter()
        for name, sc in score_exact_many(qs, b, chunks.targets[c]).items():
            parts[name].append(sc)
        dt = (time.perf_counter() - t0) / len(qs)  # FP16's share is computed once for all of them
        for name in qs:
            scoring_s[name] += dt
        if compress_to is not None:
            tops.append(compress(b, chunks.targets[c], *compress_to))

    with (
        progress.bar(label, total=chunks.n_chunks) as bar,
        ThreadPoolExecutor(1, "orlik-fp16") as fp16_pool,
        ThreadPoolExecutor(1, "orlik-score") as score_pool,
    ):
        ahead = fp16_pool.submit(fp16, 0) if overlap else None
        scoring: Future[None] | None = None
        for c in range(chunks.n_chunks):
            if ahead is None:
                b = fp16(c)
            qs: dict[str, np.ndarray] = {}
            for name, rt in rts.items():
                t0 = time.perf_counter()
                qs[name] = _scored_logits(rt, chunks, c)
                seconds[name] += time.perf_counter() - t0
            if ahead is not None:
                b = ahead.result()
                if c + 1 < chunks.n_chunks:
                    ahead = fp16_pool.submit(fp16, c + 1)
            if scoring is not None:
                scoring.result()  # in order, and raises what the scorer raised
                bar.advance()
            scoring = score_pool.submit(score, c, b, qs)
        if scoring is not None:
            scoring.result()
            bar.advance()
    scores = {n: TextScore(Series.concat(p), "exact", seconds[n] + scoring_s[n]) for n, p in parts.items()}
    return scores, (TopK.concat(tops) if compress_to is not None else None)


# Below this FP16 size FP16 runs beside the variants on half the cores each; above it they take
# turns on all of them. Measured on 2 cores (llama.cpp, 512-token chunks): for an 18 MB model two
# 1-thread passes at once took 118 ms a chunk against 142 ms in turn (small matrices leave
# threads waiting on each other); for a 213 MB model 1,277 ms against 1,079 ms (threads scale,
# and the slower FP16 pass leaves the variant's half idle).
OVERLAP_MAX_BYTES = 64 << 20


def overlap_fp16(fp16_bytes: int, total_threads: int) -> bool:
    return total_threads >= 2 and fp16_bytes <= OVERLAP_MAX_BYTES


def split_threads(total: int, overlap: bool) -> tuple[int, int]:
    """(FP16 threads, variant threads): the cores split between them when they run side by side."""
    if not overlap or total < 2:
        return total, total
    return total // 2, total - total // 2


def plan_groups(sizes: list[int], budget: int) -> list[list[int]] | None:
    """Indices of variants to run side by side, each group's total size within `budget` bytes;
    None when not even one variant fits beside FP16 (then only the top-K path is possible)."""
    if not sizes or min(sizes) > budget:
        return None if sizes else []
    groups: list[list[int]] = []
    used = budget + 1
    for i, s in enumerate(sizes):
        if s > budget:
            return None
        if used + s > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += s
    return groups


def available_memory() -> int:
    """Bytes the system can give without swapping (MemAvailable), or a conservative 4 GiB."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                return int(next(ln.split()[1] for ln in f if ln.startswith("MemAvailable"))) * 1024
        except (OSError, StopIteration):
            return 4 << 30


def choose_mode(mode: str, sizes: list[int], fp16_bytes: int) -> tuple[str, list[list[int]] | None, str]:
    """(mode, groups, why): auto is exact when FP16 fits beside at least one variant in memory."""
    if mode not in MODES:
        raise InputError(f"unknown reference mode {mode!r}; valid: {', '.join(MODES)}")
    budget = int(0.8 * available_memory()) - fp16_bytes
    groups = plan_groups(sizes, budget)
    if mode == "topk":
        return "topk", None, "asked for (--reference topk)"
    if groups is None:
        if mode == "exact":
            raise InputError(f"--reference exact needs FP16 ({fp16_bytes / (1 << 30):.1f} GiB in memory) beside the "
                             "largest variant, and this machine has too little free memory; use --reference topk")  # fmt: skip
        return "topk", None, "FP16 and a variant do not fit in memory together"
    why = "asked for (--reference exact)" if mode == "exact" else "FP16 fits in memory beside the variants"
    return "exact", groups, f"{why}; {len(groups)} group(s) scored side by side"
