"""`orlik bench`: every variant against its FP16 checkpoint on the same tokens, one Table 8.

Three steps, each on one screen: benchmarks/plan.py checks the inputs and decides how to run;
Scorer tokenizes the texts once (the FP16 reference's ids, fed to every runtime), builds or loads
the FP16 reference and scores each variant through its serving runtime; `results` and `report`
gather the figures (and speed, with --speed) into results.json, the tables, plots and model cards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from orlik import __version__, progress
from orlik.benchmarks import reference, speed
from orlik.benchmarks.evaluate import TextScore, score_exact_text, score_topk_text, token_mismatch
from orlik.benchmarks.plan import CTX, Options, Plan, choose_engine, make_plan, resolve_variants
from orlik.benchmarks.stats import Series, baseline_row, summarize
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.serving.runtimes.base import Runtime, runtime_class

__all__ = ["CTX", "Options", "Plan", "bench", "choose_engine", "make_plan", "resolve_variants"]


def bench(model: Path, variant_names: Sequence[str], *, variants_dir: Path | None = None, out: Path | None = None,
          opts: Options | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the whole comparison; returns the results dict that results.json holds."""
    from orlik.benchmarks import plots

    started = time.perf_counter()
    plots.prewarm()
    plan = make_plan(Path(model), variant_names, variants_dir=variants_dir, out=out, opts=opts)
    scorer = Scorer(plan)
    scorer.run()
    return report(plan, scorer, started)


class FP16Loader:
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


@dataclass
class Tokens:
    """Each text tokenized once, by the FP16 reference's tokenizer; every runtime is fed these ids."""

    ids: dict[str, list[int]]
    chunks: dict[str, reference.Chunks]
    bos: int | None
    n_vocab: int


class Scorer:
    """Tokenizes once, then scores every variant against FP16 in the plan's mode."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.fp16 = FP16Loader(plan.ckpt, plan.fp16_threads, plan.engine, n_ctx=plan.opts.ctx)
        self.tokens = self._tokenize()
        self.cache_dir = plan.out / "reference"
        o = plan.opts
        self.keys = {n: reference.cache_key(plan.ckpt.hash, ch, o.kmax, o.tail_mass, plan.engine)
                     for n, ch in self.tokens.chunks.items()}  # fmt: skip
        self.refs: dict[str, reference.Reference] = {}
        self.cached: dict[str, bool] = {}
        for n, key in self.keys.items():
            ref = reference.load(reference.cache_path(self.cache_dir, n, key), key)
            self.cached[n] = ref is not None
            if ref is not None:
                self.refs[n] = ref
        names = [v.name for v in plan.variants]
        self.scores: dict[str, dict[str, TextScore]] = {n: {} for n in names}
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self.runtimes: dict[str, str] = {}
        self.mismatch: dict[str, dict[str, float]] = {n: {} for n in names}  # variant -> text -> share

    def _tokenize(self) -> Tokens:
        brt, ctx = self.fp16(), self.plan.opts.ctx
        if ctx > brt.n_ctx:
            raise InputError(f"--ctx {ctx} exceeds the model's context of {brt.n_ctx} tokens")
        bos_in = brt.tokenize("a", add_bos=True)
        bos = brt.bos_id if bos_in and bos_in[0] == brt.bos_id else None
        ids = {t.name: brt.tokenize(t.text, add_bos=True) for t in self.plan.texts}
        chunks = {n: reference.make_chunks(i, ctx, bos, name=n) for n, i in ids.items()}
        return Tokens(ids, chunks, bos, brt.n_vocab)

    def run(self) -> None:
        p = self.plan
        progress.info(f"FP16 in {p.engine} ({p.engine_why}); KLD: {p.mode} ({p.mode_why})")
        if p.mode == "exact":
            for gi, group in enumerate(p.groups or []):
                self._exact_group([p.variants[i] for i in group], first=gi == 0)
        else:
            self._topk()
        self.fp16.release()

    def load(self, v: Variant) -> Runtime:
        """The variant's runtime, and how often its own tokenizer disagrees with the shared ids."""
        t0 = time.perf_counter()
        rt = runtime_class(v.format).load(v, n_ctx=self.plan.opts.ctx, threads=self.plan.variant_threads)
        self.runtimes[v.name] = rt.name
        for t in self.plan.texts:
            self.mismatch[v.name][t.name] = token_mismatch(rt, v.name, t.text, self.tokens.ids[t.name],
                                                           self.tokens.n_vocab)  # fmt: skip
        self.seconds[v.name] += time.perf_counter() - t0
        return rt

    def _exact_group(self, group: list[Variant], first: bool) -> None:
        """FP16 streamed beside the group's variants; the first group also builds missing references."""
        o, rts = self.plan.opts, {}
        try:
            for v in group:
                rts[v.name] = self.load(v)
            for n, ch in self.tokens.chunks.items():
                want_ref = first and n not in self.refs
                label = f"{', '.join(rts)} · {n}" if len(rts) <= 3 else f"{len(rts)} variants · {n}"
                got, top = score_exact_text(rts, self.fp16(), ch, label,
                                            (o.kmax, o.tail_mass) if want_ref else None, self.plan.beside)  # fmt: skip
                for name, sc in got.items():
                    self.scores[name][n] = sc
                if top is not None:
                    self._store(n, top)
        finally:
            for rt in rts.values():
                rt.close()

    def _topk(self) -> None:
        """FP16 once into the compact reference, released; then each variant alone against it."""
        o = self.plan.opts
        for n, ch in self.tokens.chunks.items():
            if n not in self.refs:
                self._store(n, reference.build(self.fp16(), ch, kmax=o.kmax, tail_mass=o.tail_mass, label=n))
        self.fp16.release()
        for v in self.plan.variants:
            rt = self.load(v)
            try:
                for n, ch in self.tokens.chunks.items():
                    self.scores[v.name][n] = score_topk_text(rt, ch, self.refs[n], f"{v.name} · {n}")
            finally:
                rt.close()

    def _store(self, n: str, top: Any) -> None:
        o, ch = self.plan.opts, self.tokens.chunks[n]
        self.refs[n] = reference.store(self.cache_dir, n, self.keys[n], top, self.plan.ckpt.hash, ch, o.kmax,
                                       o.tail_mass)  # fmt: skip

    def reference_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        for n, ref in self.refs.items():
            path = reference.cache_path(self.cache_dir, n, self.keys[n])
            info[n] = {"path": str(path), "bytes": path.stat().st_size, "reused": self.cached[n],
                       **{k: ref.meta[k] for k in ("mean_k", "positions_over_tail_mass", "kmax", "tail_mass")}}  # fmt: skip
        return info


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


def variant_rows(plan: Plan, s: Scorer) -> list[dict[str, Any]]:
    """One results entry per variant, in Table 8's order: largest first."""
    out = []
    for v in sorted(plan.variants, key=lambda v: (-v.bytes, v.name)):
        out.append({"name": v.name, "format": v.format, "bytes": v.bytes, "bpw": v.bpw, "path": str(v.path),
                    "runtime": s.runtimes[v.name], "recipe": v.recipe, "files": v.files, "logs": v.logs,
                    "tools": v.tools, "calibration_hash": v.calibration_hash, "imatrix_hash": v.imatrix_hash,
                    "rows": _rows(s.scores[v.name]), "token_mismatch": s.mismatch[v.name],
                    "eval_seconds": s.seconds[v.name] + sum(sc.seconds for sc in s.scores[v.name].values())})  # fmt: skip
    return out


def fp16_row(plan: Plan, s: Scorer) -> dict[str, Any]:
    # The base NLL series is the same for every variant (same tokens, same FP16 logits).
    fp16_nll = {n: sc.series.nll_b for n, sc in s.scores[plan.variants[0].name].items()}
    rows = {n: baseline_row(fp16_nll[n]) for n in fp16_nll}
    if len(fp16_nll) > 1:
        rows["all"] = baseline_row(np.concatenate(list(fp16_nll.values())))
    ckpt = plan.ckpt
    return {"name": "FP16", "format": "fp16", "bytes": ckpt.weights_bytes, "bpw": ckpt.bpw, "path": str(ckpt.path),
            "runtime": plan.engine, "rows": rows}  # fmt: skip


def settings(plan: Plan) -> dict[str, Any]:
    o = plan.opts
    return {"ctx": o.ctx, "reference": o.mode, "fp16_engine": plan.engine, "fp16_engine_why": plan.engine_why,
            "kld_mode": plan.mode, "kld_mode_why": plan.mode_why, "kmax": o.kmax, "tail_mass": o.tail_mass,
            "threads": {"fp16": plan.fp16_threads, "variants": plan.variant_threads,
                        "fp16_beside_variants": plan.beside},
            "scored_positions_per_chunk": o.ctx - 1 - o.ctx // 2}  # fmt: skip


def report(plan: Plan, s: Scorer, started: float) -> dict[str, Any]:
    """Gather the results (and speed, with --speed), then write the report, plots and model cards."""
    from orlik.benchmarks import modelcard, plots
    from orlik.benchmarks import report as rep

    fp16, results_v = fp16_row(plan, s), variant_rows(plan, s)
    if plan.opts.speed:
        prompt_sets = speed.prompts(s.tokens.ids[plan.texts[0].name], s.tokens.bos)
        speeds = speed.measure_all([("FP16", plan.ckpt.path)] + [(v.name, v.path) for v in plan.variants if v.path],
                                   prompt_sets, threads=plan.opts.threads)  # fmt: skip
        for r in (fp16, *results_v):
            r["speed"] = speeds.get(r["name"])
    ref_info, ch = s.reference_info(), s.tokens.chunks
    results = {
        "orlik": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": speed.machine(), "tools": rep.tool_versions(), "model": rep.model_facts(plan.ckpt),
        "settings": settings(plan),
        "texts": {t.name: {"source": t.source, "tokens": len(s.tokens.ids[t.name]), "chunks": ch[t.name].n_chunks,
                           "scored_tokens": ch[t.name].n_scored, "tokens_sha256": ch[t.name].digest,
                           "reference": ref_info.get(t.name)} for t in plan.texts},
        "overlap": plan.overlap, "variants": [fp16, *results_v], "seconds": time.perf_counter() - started,
    }  # fmt: skip
    results["out"] = str(plan.out)
    results["plots"] = plots.write_all(results, plan.out)
    rep.write_all(results, plan.out)
    if plan.opts.cards:
        results["cards"] = modelcard.write_all(results, plan.variants, plan.ckpt, plan.out, license=plan.opts.license,
                                               base_model=plan.opts.base_model)  # fmt: skip
        rep.write_json(results, plan.out)
    return results
