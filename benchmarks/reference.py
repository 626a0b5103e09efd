"""The FP16 reference of one evaluation text: computed once per checkpoint, text and ctx, stored
compressed (top-K log-probs + exact tail mass and tail Σp·log p) and cached by content hash.

llama-perplexity keeps ~2 bytes per vocabulary entry per scored token (6.5 GB for a 32k vocab and
100k tokens). This file keeps 6 bytes per *kept* entry (uint16 id + fp32 log-prob), with K chosen
per position so the left-out mass is <= tail_mass, at most kmax: <= 600 MB at kmax 1024 for the same
text, and far less on peaked distributions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orlik import __version__, progress
from orlik.benchmarks.scoring import TopK, compress
from orlik.errors import InputError
from orlik.fsutil import check_writable, sha256_bytes

FORMAT_VERSION = 1
KMAX = 1024
TAIL_MASS = 1e-4


@dataclass
class Chunks:
    """A tokenized text cut the llama-perplexity way: chunks of ctx tokens, BOS written over each
    chunk's first token (when the model uses BOS), the last ctx−1−ctx/2 predictions scored."""

    tokens: np.ndarray  # int32 [n_chunk, ctx], as fed to the model
    targets: np.ndarray  # int32 [n_chunk, n_scored], the observed next tokens
    ctx: int

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def n_chunks(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.targets.size)

    @property
    def digest(self) -> str:
        return sha256_bytes(self.tokens.tobytes() + self.targets.tobytes())


def make_chunks(ids: list[int], ctx: int, bos: int | None, *, name: str = "text") -> Chunks:
    if ctx < 8:
        raise InputError(f"--ctx {ctx} is too small (at least 8)")
    if len(ids) < 2 * ctx:
        raise InputError(
            f"evaluation text {name!r} has {len(ids)} tokens; at least 2×ctx = {2 * ctx} are needed "
            f"(use a longer text or a smaller --ctx)"
        )
    n_chunk = len(ids) // ctx
    raw = np.asarray(ids[: n_chunk * ctx], dtype=np.int32).reshape(n_chunk, ctx)
    first = ctx // 2
    targets = raw[:, first + 1 :].copy()
    fed = raw.copy()
    if bos is not None:
        fed[:, 0] = bos
    return Chunks(tokens=fed, targets=targets, ctx=ctx)


@dataclass
class Reference:
    meta: dict[str, Any]
    top: TopK

    @property
    def nbytes(self) -> int:
        return self.top.nbytes

    def chunk(self, i: int, per_chunk: int) -> TopK:
        return self.top.rows(i * per_chunk, (i + 1) * per_chunk)


def cache_key(
    ckpt_hash: str, chunks: Chunks, kmax: int, tail_mass: float, engine: str = "transformers"
) -> str:
    spec = {"v": FORMAT_VERSION, "ckpt": ckpt_hash, "tokens": chunks.digest, "ctx": chunks.ctx,
            "kmax": kmax, "tail_mass": tail_mass, "engine": engine}  # fmt: skip
    return sha256_bytes(json.dumps(spec, sort_keys=True).encode())


def cache_path(cache_dir: Path, name: str, key: str) -> Path:
    return Path(cache_dir) / f"{name}-{key[:16]}.npz"


def load(path: Path, key: str) -> Reference | None:
    """The cached reference at `path`, or None when absent, stale or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                return None
            top = TopK(**{f: z[f] for f in TopK.__dataclass_fields__})
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        progress.info(f"[yellow]reference cache {path} is unreadable; rebuilding it[/]")
        return None
    return Reference(meta=meta, top=top)


def save(path: Path, ref: Reference) -> None:
    check_writable(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        arrays = {f: getattr(ref.top, f) for f in TopK.__dataclass_fields__}
        np.savez(tmp, meta=np.array(json.dumps(ref.meta)), **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build(
    base: Any, chunks: Chunks, *, kmax: int = KMAX, tail_mass: float = TAIL_MASS, label: str = ""
) -> TopK:
    """Run the FP16 runtime over every chunk and compress its scored rows."""
    parts = []
    with progress.bar(f"FP16 reference {label}".strip(), total=chunks.n_chunks) as bar:
        for c in range(chunks.n_chunks):
            logits = base.logits_from(chunks.tokens[c].tolist(), chunks.first)[:-1]
            parts.append(compress(logits, chunks.targets[c], kmax, tail_mass))
            bar.advance()
    return TopK.concat(parts)


def store(cache_dir: Path, name: str, key: str, top: TopK, ckpt_hash: str, chunks: Chunks, kmax: int,
          tail_mass: float) -> Reference:  # fmt: skip
    """Save a freshly built reference under its key and return it."""
    counts = np.diff(top.offsets)
    meta = {"key": key, "format_version": FORMAT_VERSION, "orlik": __version__, "checkpoint_hash": ckpt_hash,
            "tokens_sha256": chunks.digest, "ctx": chunks.ctx, "n_chunks": chunks.n_chunks,
            "scored_tokens": chunks.n_scored, "kmax": kmax, "tail_mass": tail_mass,
            "mean_k": float(counts.mean()), "positions_over_tail_mass": int((top.tail_mass > tail_mass).sum())}  # fmt: skip
    ref = Reference(meta=meta, top=top)
    save(cache_path(cache_dir, name, key), ref)
    return ref
