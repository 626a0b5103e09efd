"""How well the auto recipe's KLD estimate predicts real KLD: Spearman rank correlation between the
estimate (probe-calibrated, and the Fisher estimate alone) and llama-perplexity --kl-divergence on
held-out Polish text, over stock file types, single-tensor probes (Q8_0 everywhere but one tensor at
a low type: equal-size configurations that only the per-tensor sensitivity can rank) and existing
GGUF variants (e.g. stock and auto files of equal size).

    python -m orlik.quantize.rankcheck runs/m/fp16 --calib runs/m/calib --out runs/m/rankcheck
    python -m orlik.quantize.rankcheck runs/m/fp16 --calib runs/m/calib --out DIR --stock none \
        --probes 8 --variants runs/m/variants/Q4_K_M-imat runs/m/variants/auto-like-Q4_K_M
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from orlik import corpus, gguf_read, llamacpp
from orlik.checkpoint import Checkpoint
from orlik.errors import ToolError
from orlik.gguf_convert import f16_gguf
from orlik.quantize.backends import gguf_auto
from orlik.quantize.backends.gguf import glob_to_regex
from orlik.quantize.recipe import Recipe
from orlik.quantize.run import calibration_for

STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
_KLD = re.compile(r"Mean\s+KLD:\s+(-?[0-9.]+)\s+±\s+([0-9.]+)")


def _probes(table: dict[str, Any], low: str) -> dict[str, dict[str, str]]:
    """One configuration per probed tensor: all Q8_0, that tensor at `low` (or its nearest type)."""
    names = list(table["tensors"])
    out = {}
    for n in names:
        types = table["tensors"][n]["types"]
        pick = low if low in types else min(types, key=lambda t: -types[t])  # worst available
        out[f"probe:{n}={pick}"] = {m: ("Q8_0" if m != n else pick) for m in names}
    return out


def _kld(quant: Path, base: Path, ctx: int, threads: int, chunks: int) -> tuple[float, float] | None:
    args = ["-m", str(quant), "-c", str(ctx), "-b", str(ctx), "-t", str(threads),
            *(["--chunks", str(chunks)] if chunks else []), "--kl-divergence-base", str(base), "--kl-divergence"]  # fmt: skip
    for _ in range(6):  # its logger can drop the final lines on a busy machine
        rc, log = llamacpp.run_tool("llama-perplexity", args)
        m = _KLD.search(log)
        if rc == 0 and m:
            return float(m.group(1)), float(m.group(2))
    return None


def run(model: Path, calib_dir: Path, out: Path, low: str, max_probes: int, ctx: int, threads: int,
        stock: tuple[str, ...] = STOCK, variants: tuple[Path, ...] = (), chunks: int = 0) -> dict[str, Any]:  # fmt: skip
    ckpt = Checkpoint.open(model)
    calib = calibration_for(calib_dir)
    f16 = f16_gguf(ckpt)
    source = gguf_read.summarize(f16)
    recipe = Recipe.from_name("auto-like-Q4_K_M")
    table = gguf_auto.sensitivity_table(ckpt, recipe, calib, source, calib.imatrix, threads)
    out.mkdir(parents=True, exist_ok=True)
    text = out / "heldout-pl.txt"
    text.write_text(corpus.heldout_text("pl"), encoding="utf-8")
    base = out / f"f16-{chunks or 'all'}.kld"
    if not base.is_file():
        rc, log = llamacpp.run_tool("llama-perplexity", ["-m", str(f16), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
                                                         "-t", str(threads), *(["--chunks", str(chunks)] if chunks else []),
                                                         "--kl-divergence-base", str(base)])  # fmt: skip
        if rc != 0:
            raise ToolError("llama-perplexity could not write the F16 logits")
    configs = {f"stock:{q}": gguf_auto.stock_types(f16, q, calib.imatrix) for q in stock}
    probes = _probes(table, low)
    step = max(1, len(probes) // max_probes) if max_probes else 1
    configs.update(dict(list(probes.items())[::step][:max_probes]))
    rows = []
    for name, types in configs.items():
        dst = out / "model.gguf"
        args = ["--imatrix", str(calib.imatrix)] if calib.imatrix else []
        for n, t in types.items():
            args += ["--tensor-type", f"{glob_to_regex(n)}={t.lower()}"]
        rc, log = llamacpp.run_tool("llama-quantize", [*args, str(f16), str(dst), "Q8_0", str(threads)])
        if rc != 0:
            raise ToolError(f"llama-quantize failed for {name}: {log.strip().splitlines()[-1:]}")
        rows += _measure(name, table, types, dst, base, ctx, threads, chunks)
        dst.unlink()
    for v in variants:
        f = v / "model.gguf"
        types = {n: t for n, t in gguf_read.summarize(f).types().items() if n in table["tensors"]}
        rows += _measure(f"variant:{v.name}", table, types, f, base, ctx, threads, chunks)
    return {"model": str(model), "ctx": ctx, "chunks": chunks, "probes": table.get("probes"), "rows": rows,
            **_correlations(rows)}  # fmt: skip


def _measure(name: str, table: dict[str, Any], types: dict[str, str], gguf: Path, base: Path, ctx: int,
             threads: int, chunks: int) -> list[dict[str, Any]]:  # fmt: skip
    got = _kld(gguf, base, ctx, threads, chunks)
    if got is None:
        print(f"{name}: llama-perplexity printed no KLD; left out", flush=True)
        return []
    row = {"config": name, "bytes": gguf.stat().st_size, "estimated_kld": gguf_auto.estimate(table, types),
           "estimated_kld_fisher": gguf_auto.estimate(table, types, False), "kld": got[0], "kld_err": got[1]}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def _correlations(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from scipy.stats import spearmanr

    def rho(sel: list[dict[str, Any]], key: str) -> float | None:
        sel = [r for r in sel if r[key] is not None]
        if len(sel) < 3:
            return None
        return float(spearmanr([r[key] for r in sel], [r["kld"] for r in sel]).statistic)

    out = {}
    for group in ("all", "stock", "probe", "variant"):
        sel = [r for r in rows if group == "all" or r["config"].startswith(group + ":")]
        out[f"spearman_{group}"] = rho(sel, "estimated_kld")
        out[f"spearman_{group}_fisher"] = rho(sel, "estimated_kld_fisher")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path, required=True, help="calibration dir with imatrix.gguf")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--low", default="Q2_K", help="type of the probed tensor")
    ap.add_argument(
        "--probes", type=int, default=16, help="most single-tensor probes (spread over the model)"
    )
    ap.add_argument("--stock", default=",".join(STOCK), help="stock file types to measure, or 'none'")
    ap.add_argument(
        "--variants", type=Path, nargs="*", default=[], help="existing GGUF variant dirs to measure"
    )
    ap.add_argument("--chunks", type=int, default=0, help="held-out chunks of --ctx tokens (0: all)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    stock = () if a.stock == "none" else tuple(q.strip() for q in a.stock.split(",") if q.strip())
    res = run(a.model, a.calib, a.out, a.low, a.probes, a.ctx, a.threads, stock, tuple(a.variants), a.chunks)
    (a.out / "rankcheck.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print({k: v for k, v in res.items() if k.startswith("spearman")})


if __name__ == "__main__":
    main()
