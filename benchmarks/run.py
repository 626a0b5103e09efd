"""`orlik bench`: every variant against its FP16 checkpoint on the same tokens, one Table 8.

Checks the inputs first (variants, manifests, texts, calibration overlap, tokenizers), builds or
loads the FP16 reference per text, scores each variant through its serving runtime, optionally
measures speed and memory, then writes the report, plots and model cards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orlik import __version__, paths, progress
from orlik.benchmarks import reference, speed, texts
from orlik.benchmarks.evaluate import (
    TextScore,
    check_tokenizer,
    choose_mode,
    overlap_fp16,
    score_exact_text,
    score_topk_text,
    split_threads,
)
from orlik.benchmarks.stats import Series, baseline_row, summarize
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ManifestError
from orlik.manifest import MANIFEST, Variant
from orlik.serving.runtimes.base import Runtime, runtime_class
from orlik.sysinfo import usable_cores

CTX = 512  # tokens per evaluation chunk; the second half of each is scored


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


ENGINES = ("auto", "transformers", "llama.cpp")


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


class BaseModel:
    """The FP16 runtime, loaded when first needed and released between phases to save memory."""

    def __init__(
        self, ckpt: Checkpoint, threads: int | None, engine: str = "transformers", n_ctx: int = 0
    ) -> None:
        self.ckpt, self.threads, self.engine, self.n_ctx = ckpt, threads, engine, n_ctx
        self._rt: Runtime | None = None

    def __call__(self) -> Runtime:
        if self._rt is None:
            if self.engine == "llama.cpp":
                from orlik.gguf_convert import f16_gguf

                path = f16_gguf(self.ckpt)  # cached by checkpoint hash; converted once by `orlik quantize`
                progress.info(f"loading FP16 {self.ckpt.path} in llama.cpp ({path.name})")
                self._rt = runtime_class("gguf").load(path, n_ctx=self.n_ctx, threads=self.threads)
            else:
                progress.info(f"loading FP16 {self.ckpt.path} in transformers")
                self._rt = runtime_class("fp16").load(self.ckpt, threads=self.threads)
        return self._rt

    def release(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None


def _rows(scores: dict[str, TextScore]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, sc in scores.items():
        rows[name] = {**summarize(sc.series), "mode": sc.mode, "seconds": sc.seconds}
    if len(scores) > 1:
        all_ = Series.concat([sc.series for sc in scores.values()])
        modes = {sc.mode for sc in scores.values()}
        rows["all"] = {**summarize(all_), "mode": modes.pop() if len(modes) == 1 else "mixed",
                       "seconds": sum(sc.seconds for sc in scores.values())}  # fmt: skip
    return rows


def bench(model: Path, variant_names: Sequence[str], *, variants_dir: Path | None = None, out: Path | None = None,
          opts: Options | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the whole comparison; returns the results dict that results.json holds."""
    from orlik.benchmarks import modelcard, plots, report

    opts = opts or Options()
    started = time.perf_counter()
    plots.prewarm()
    ckpt = Checkpoint.open(model)
    variants_dir = Path(variants_dir or paths.variants_dir(model))
    out = Path(out or paths.reports_dir(model))
    variants = resolve_variants(variant_names, variants_dir)
    for v in variants:
        if opts.verify:
            bad = v.verify()
            if bad:
                raise ManifestError(
                    f"variant {v.name}: files differ from {v.path}/{MANIFEST}: {', '.join(bad)}"
                )
        if v.base_hash != ckpt.hash:
            raise InputError(f"variant {v.name} was made from checkpoint {v.base_hash[:12]}, not from "
                             f"{ckpt.path} ({ckpt.hash[:12]}); compare it with its own FP16 checkpoint")  # fmt: skip
        runtime_class(v.format)  # an unknown format or a missing runtime fails here, before any work

    eval_texts = texts.file_texts(list(opts.text_files)) if opts.text_files else texts.heldout_texts()
    calib = opts.calib
    if calib is None and (paths.calib_dir(model) / "calibration.jsonl").is_file():
        calib = paths.calib_dir(model) / "calibration.jsonl"
    overlap = texts.check_overlap(eval_texts, calib) if calib else None

    engine, engine_why = choose_engine(opts.engine, variants)
    n_ctx_train = int(ckpt.config.get("max_position_embeddings") or 0)
    if n_ctx_train and opts.ctx > n_ctx_train:
        raise InputError(f"--ctx {opts.ctx} exceeds the model's context of {n_ctx_train} tokens")
    # transformers holds the fp16 weights as fp32, hence twice the file; llama.cpp maps them as they are.
    fp16_mem = ckpt.weights_bytes * (2 if engine == "transformers" else 1)
    mode, groups, why = choose_mode(opts.mode, [v.bytes for v in variants], fp16_mem)
    total_threads = opts.threads or usable_cores()
    beside = mode == "exact" and overlap_fp16(ckpt.weights_bytes, total_threads)
    fp16_threads, variant_threads = split_threads(total_threads, beside)
    base = BaseModel(ckpt, fp16_threads, engine, n_ctx=opts.ctx)
    brt = base()
    if opts.ctx > brt.n_ctx:
        raise InputError(f"--ctx {opts.ctx} exceeds the model's context of {brt.n_ctx} tokens")
    bos_in = brt.tokenize("a", add_bos=True)
    bos = brt.bos_id if bos_in and bos_in[0] == brt.bos_id else None
    ids = {t.name: brt.tokenize(t.text, add_bos=True) for t in eval_texts}
    chunked = {t.name: reference.make_chunks(ids[t.name], opts.ctx, bos, name=t.name) for t in eval_texts}
    n_vocab = brt.n_vocab

    progress.info(f"FP16 in {engine} ({engine_why}); KLD: {mode} ({why})")
    cache_dir = out / "reference"
    keys = {
        n: reference.cache_key(ckpt.hash, ch, opts.kmax, opts.tail_mass, engine) for n, ch in chunked.items()
    }
    refs: dict[str, reference.Reference] = {}
    cached: dict[str, bool] = {}
    for n in chunked:
        ref = reference.load(reference.cache_path(cache_dir, n, keys[n]), keys[n])
        cached[n] = ref is not None
        if ref is not None:
            refs[n] = ref
    scores: dict[str, dict[str, TextScore]] = {v.name: {} for v in variants}
    seconds: dict[str, float] = dict.fromkeys(scores, 0.0)
    runtimes: dict[str, str] = {}

    def load(v: Variant) -> Runtime:
        t0 = time.perf_counter()
        rt = runtime_class(v.format).load(v, n_ctx=opts.ctx, threads=variant_threads)
        runtimes[v.name] = rt.name
        for t in eval_texts:
            check_tokenizer(rt, v.name, t.name, t.text, ids[t.name], n_vocab)
        seconds[v.name] += time.perf_counter() - t0
        return rt

    if mode == "exact":
        for gi, group in enumerate(groups or []):
            rts: dict[str, Runtime] = {}
            try:
                for i in group:
                    rts[variants[i].name] = load(variants[i])
                for n, ch in chunked.items():
                    want_ref = gi == 0 and n not in refs
                    label = f"{', '.join(rts)} · {n}" if len(rts) <= 3 else f"{len(rts)} variants · {n}"
                    got, top = score_exact_text(rts, base(), ch, label,
                                                (opts.kmax, opts.tail_mass) if want_ref else None, beside)  # fmt: skip
                    for name, sc in got.items():
                        scores[name][n] = sc
                    if top is not None:
                        refs[n] = reference.store(
                            cache_dir, n, keys[n], top, ckpt.hash, ch, opts.kmax, opts.tail_mass
                        )
            finally:
                for rt in rts.values():
                    rt.close()
    else:
        for n, ch in chunked.items():
            if n not in refs:
                top = reference.build(base(), ch, kmax=opts.kmax, tail_mass=opts.tail_mass, label=n)
                refs[n] = reference.store(
                    cache_dir, n, keys[n], top, ckpt.hash, ch, opts.kmax, opts.tail_mass
                )
        base.release()
        for v in variants:
            rt = load(v)
            try:
                for n, ch in chunked.items():
                    scores[v.name][n] = score_topk_text(rt, ch, refs[n], f"{v.name} · {n}")
            finally:
                rt.close()
    base.release()

    ref_info: dict[str, Any] = {}
    for n in chunked:
        if n in refs:
            path = reference.cache_path(cache_dir, n, keys[n])
            ref_info[n] = {"path": str(path), "bytes": path.stat().st_size, "reused": cached[n],
                           **{k: refs[n].meta[k] for k in ("mean_k", "positions_over_tail_mass", "kmax", "tail_mass")}}  # fmt: skip

    results_v: list[dict[str, Any]] = []
    for v in sorted(variants, key=lambda v: (-v.bytes, v.name)):  # Table 8's order: largest first
        results_v.append({"name": v.name, "format": v.format, "bytes": v.bytes, "bpw": v.bpw, "path": str(v.path),
                          "runtime": runtimes[v.name], "recipe": v.recipe, "files": v.files, "tools": v.tools,
                          "calibration_hash": v.calibration_hash, "imatrix_hash": v.imatrix_hash,
                          "rows": _rows(scores[v.name]),
                          "eval_seconds": seconds[v.name] + sum(sc.seconds for sc in scores[v.name].values())})  # fmt: skip
    # The base NLL series is the same for every variant (same tokens, same FP16 logits).
    fp16_nll = {n: sc.series.nll_b for n, sc in scores[variants[0].name].items()}

    fp16_rows = {n: baseline_row(fp16_nll[n]) for n in fp16_nll}
    if len(fp16_nll) > 1:
        import numpy as np

        fp16_rows["all"] = baseline_row(np.concatenate(list(fp16_nll.values())))
    fp16 = {"name": "FP16", "format": "fp16", "bytes": ckpt.weights_bytes, "bpw": _fp16_bpw(ckpt),
            "path": str(ckpt.path), "runtime": engine, "rows": fp16_rows}  # fmt: skip

    speeds = None
    if opts.speed:
        first = eval_texts[0].name
        prompt_sets = speed.prompts(ids[first], bos)
        speeds = speed.measure_all([("FP16", ckpt.path)] + [(v.name, v.path) for v in variants if v.path],
                                   prompt_sets, threads=opts.threads)  # fmt: skip
        fp16["speed"] = speeds.get("FP16")
        for r in results_v:
            r["speed"] = speeds.get(r["name"])

    results = {
        "orlik": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": speed.machine(),
        "tools": report.tool_versions(),
        "model": report.model_facts(ckpt),
        "settings": {
            "ctx": opts.ctx,
            "reference": opts.mode,
            "fp16_engine": engine,
            "fp16_engine_why": engine_why,
            "kld_mode": mode,
            "kld_mode_why": why,
            "kmax": opts.kmax,
            "tail_mass": opts.tail_mass,
            "threads": {"fp16": fp16_threads, "variants": variant_threads, "fp16_beside_variants": beside},
            "scored_positions_per_chunk": opts.ctx - 1 - opts.ctx // 2,
        },
        "texts": {
            t.name: {
                "source": t.source,
                "tokens": len(ids[t.name]),
                "chunks": chunked[t.name].n_chunks,
                "scored_tokens": chunked[t.name].n_scored,
                "tokens_sha256": chunked[t.name].digest,
                "reference": ref_info.get(t.name),
            }
            for t in eval_texts
        },
        "overlap": overlap,
        "variants": [fp16, *results_v],
        "seconds": time.perf_counter() - started,
    }
    results["out"] = str(out)
    results["plots"] = plots.write_all(results, out)
    report.write_all(results, out)
    if opts.cards:
        results["cards"] = modelcard.write_all(results, variants, ckpt, out, license=opts.license,
                                               base_model=opts.base_model)  # fmt: skip
        report.write_json(results, out)
    return results


def _fp16_bpw(ckpt: Checkpoint) -> float:
    """Bits per weight of the checkpoint, from the safetensors headers (16.0 for fp16/bf16)."""
    import json
    import math

    params = 0
    for w in ckpt.weight_files:
        with open(w, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        params += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return ckpt.weights_bytes * 8 / params if params else 16.0
