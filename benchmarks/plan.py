"""What `orlik bench` will run, decided before any model loads: the checked inputs, where FP16's
logits come from, how the KLD is computed and how the cores are shared. `--dry-run` prints it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orlik import paths
from orlik.benchmarks import reference, texts
from orlik.benchmarks.evaluate import choose_mode, overlap_fp16, split_threads
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ManifestError
from orlik.manifest import MANIFEST, Variant
from orlik.serving.runtimes.base import runtime_class
from orlik.sysinfo import usable_cores

CTX = 512  # tokens per evaluation chunk; the second half of each is scored
ENGINES = ("auto", "transformers", "llama.cpp")


@dataclass
class Options:
    ctx: int = CTX
    text_files: Sequence[Path] = ()
    calib: Path | None = None
    speed: bool = False
    mode: str = "auto"
    engine: str = "auto"  # how FP16 logits are computed: transformers, llama.cpp (F16 GGUF) or auto
    kmax: int = reference.KMAX
    tail_mass: float = reference.TAIL_MASS
    threads: int | None = None
    verify: bool = True
    cards: bool = True
    license: str | None = None
    base_model: str | None = None


@dataclass
class Plan:
    ckpt: Checkpoint
    variants: list[Variant]
    out: Path
    texts: list[texts.EvalText]
    overlap: dict[str, Any] | None
    engine: str
    engine_why: str
    mode: str  # "exact" or "topk"
    groups: list[list[int]] | None  # exact mode: indices of the variants loaded together
    mode_why: str
    fp16_threads: int
    variant_threads: int
    beside: bool  # FP16 runs beside the variants (half the cores each) rather than in turn
    opts: Options

    def describe(self) -> dict[str, Any]:
        """The plan as plain data, for `orlik bench --dry-run` and results.json's settings."""
        return {
            "model": str(self.ckpt.path),
            "variants": [
                {"name": v.name, "format": v.format, "bytes": v.bytes, "path": str(v.path)}
                for v in self.variants
            ],
            "texts": {t.name: t.source for t in self.texts},
            "out": str(self.out),
            "ctx": self.opts.ctx,
            "fp16_engine": self.engine,
            "fp16_engine_why": self.engine_why,
            "kld_mode": self.mode,
            "kld_mode_why": self.mode_why,
            "groups": [[self.variants[i].name for i in g] for g in self.groups or []],
            "threads": {
                "fp16": self.fp16_threads,
                "variants": self.variant_threads,
                "fp16_beside_variants": self.beside,
            },
            "speed": self.opts.speed,
        }


def make_plan(model: Path, variant_names: Sequence[str], *, variants_dir: Path | None = None,
              out: Path | None = None, opts: Options | None = None) -> Plan:  # fmt: skip
    """Check every input and decide how to run; loads no model, so bad input fails in a second."""
    opts = opts or Options()
    ckpt = Checkpoint.open(model)
    variants = resolve_variants(variant_names, Path(variants_dir or paths.variants_dir(model)))
    for v in variants:
        check_variant(v, ckpt, opts.verify)
    n_ctx_train = int(ckpt.config.get("max_position_embeddings") or 0)
    if n_ctx_train and opts.ctx > n_ctx_train:
        raise InputError(f"--ctx {opts.ctx} exceeds the model's context of {n_ctx_train} tokens")
    eval_texts = texts.file_texts(list(opts.text_files)) if opts.text_files else texts.heldout_texts()
    calib = opts.calib
    if calib is None and (paths.calib_dir(model) / "calibration.jsonl").is_file():
        calib = paths.calib_dir(model) / "calibration.jsonl"
    overlap = texts.check_overlap(eval_texts, calib) if calib else None

    engine, engine_why = choose_engine(opts.engine, variants)
    # transformers holds the fp16 weights as fp32, hence twice the file; llama.cpp maps them as they are.
    fp16_mem = ckpt.weights_bytes * (2 if engine == "transformers" else 1)
    mode, groups, why = choose_mode(opts.mode, [v.bytes for v in variants], fp16_mem)
    total_threads = opts.threads or usable_cores()
    beside = mode == "exact" and overlap_fp16(ckpt.weights_bytes, total_threads)
    fp16_threads, variant_threads = split_threads(total_threads, beside)
    return Plan(ckpt, variants, Path(out or paths.reports_dir(model)), eval_texts, overlap, engine, engine_why,
                mode, groups, why, fp16_threads, variant_threads, beside, opts)  # fmt: skip


def check_variant(v: Variant, ckpt: Checkpoint, verify: bool) -> None:
    """Its files match its manifest, it was made from this checkpoint, and its format runs here."""
    if verify:
        bad = v.verify()
        if bad:
            raise ManifestError(f"variant {v.name}: files differ from {v.path}/{MANIFEST}: {', '.join(bad)}")
    if v.base_hash != ckpt.hash:
        raise InputError(f"variant {v.name} was made from checkpoint {v.base_hash[:12]}, not from "
                         f"{ckpt.path} ({ckpt.hash[:12]}); compare it with its own FP16 checkpoint")  # fmt: skip
    runtime_class(v.format)  # an unknown format or a missing runtime fails here, before any work


def resolve_variants(names: Sequence[str], variants_dir: Path) -> list[Variant]:
    """Each name is a variant directory or a name under variants_dir; none means all of them."""
    available = (
        sorted(p.name for p in variants_dir.iterdir() if (p / MANIFEST).is_file())
        if variants_dir.is_dir()
        else []
    )
    if not names:
        if not available:
            raise InputError(f"no variants given and none found in {variants_dir}; run `orlik quantize` first "
                             "or name variant directories")  # fmt: skip
        names = available
    out: list[Variant] = []
    for n in names:
        p = Path(n)
        if not p.is_dir():
            p = variants_dir / n
        if not p.is_dir():
            hint = f"; available in {variants_dir}: {', '.join(available)}" if available else ""
            raise InputError(f"variant {n!r} not found (not a directory, nor in {variants_dir}){hint}")
        out.append(Variant.load(p))
    seen: set[str] = set()
    for v in out:
        if v.name in seen or v.name == "FP16":
            raise InputError(f"two variants are named {v.name!r}; give each its own name")
        seen.add(v.name)
    return out


def choose_engine(engine: str, variants: Sequence[Variant]) -> tuple[str, str]:
    """(engine, why). auto runs FP16 in llama.cpp, from the checkpoint's lossless 16-bit GGUF, when
    every variant is GGUF: the reference then shares the variants' kernels, as llama-perplexity's
    base pass does, and no torch is loaded. With any other format in the table, FP16 runs in
    transformers, the neutral ground for all of them."""
    if engine not in ENGINES:
        raise InputError(f"unknown FP16 engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine != "auto":
        return engine, "asked for (--fp16-engine)"
    if variants and all(v.format == "gguf" for v in variants) and runtime_class("gguf").missing() is None:
        return "llama.cpp", "every variant is GGUF"
    return "transformers", "the table has non-GGUF variants" if variants else "default"
