"""`orlik recommend`: the variant with the lowest KLD that fits a memory budget, counting the
weights, the KV cache at the requested context and, when `bench --speed` measured it, the
runtime's own working memory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from orlik.errors import InputError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip
GIB = 1 << 30
KV_BYTES = 2  # f16 keys and values, the llama.cpp and transformers default


def parse_size(text: str) -> int:
    """'4GiB', '4 GB', '512MiB', '3.5G' -> bytes (G/GB are decimal, GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 8GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def kv_cache_bytes(model: dict[str, Any], ctx: int) -> int:
    """Keys and values for every layer at `ctx` tokens: 2 × layers × kv_heads × head_dim × ctx × 2 bytes."""
    return 2 * model["layers"] * model["kv_heads"] * model["head_dim"] * ctx * KV_BYTES


def load_results(reports: Path) -> dict[str, Any]:
    f = reports / "results.json" if reports.is_dir() else reports
    if not f.is_file():
        raise InputError(f"{f} does not exist; run `orlik bench` first (or point --reports at its output)")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{f} is not valid JSON: {e}") from None


def find_reports(start: Path = Path("runs")) -> Path:
    found = sorted(start.glob("*/reports/results.json"))
    if len(found) != 1:
        where = ", ".join(str(f.parent) for f in found) or f"nothing under {start}/*/reports"
        raise InputError(f"give --reports DIR (found {where})")
    return found[0].parent


def recommend(results: dict[str, Any], budget: int, ctx: int) -> dict[str, Any]:
    """Every variant's memory need at ctx and the pick; raises if nothing fits."""
    model = results["model"]
    kv = kv_cache_bytes(model, ctx)
    text = "all" if len(results["texts"]) > 1 else next(iter(results["texts"]))
    measured: dict[str, int] = {}
    for v in results["variants"]:
        sp = v.get("speed") or {}
        if "peak_rss_gen_bytes" in sp and not (v["format"] == "fp16" and sp.get("runtime") == "transformers"):
            # Working memory beyond weights and KV (compute buffers, logits): peak RSS minus the
            # interpreter's baseline, the weights and the KV cache of the measurement's context.
            speed_kv = kv_cache_bytes(model, sp["prompt_tokens"] + sp["gen_tokens"])
            measured[v["name"]] = max(
                0, sp["peak_rss_gen_bytes"] - sp["rss_base_bytes"] - v["bytes"] - speed_kv
            )
    rows = []
    for v in results["variants"]:
        # FP16 runs in transformers (as fp32) only as the reference; deployed it would run like the
        # variants, so it gets their largest measured overhead.
        overhead = measured.get(v["name"], max(measured.values(), default=0) if v["format"] == "fp16" else 0)
        need = v["bytes"] + kv + overhead
        r = v["rows"][text]
        rows.append({"name": v["name"], "format": v["format"], "weights": v["bytes"], "kv_cache": kv,
                     "overhead": overhead, "overhead_measured": bool(measured), "need": need,
                     "fits": need <= budget, "kld": r["kld"], "ppl": r["ppl"], "same_top": r["same_top"]})  # fmt: skip
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: (r["kld"], r["need"]))
    if not fitting:
        smallest = min(rows, key=lambda r: r["need"])
        raise InputError(f"nothing fits in {human(budget)} at ctx {ctx}: the smallest, {smallest['name']}, "
                         f"needs {human(smallest['need'])} ({human(smallest['weights'])} weights + "
                         f"{human(kv)} KV cache + {human(smallest['overhead'])} runtime memory); use a smaller --ctx or a "
                         "bigger budget")  # fmt: skip
    pick = fitting[0]
    better = [r for r in rows if r["kld"] < pick["kld"] and not r["fits"]]
    why = (f"{pick['name']} ({pick['format']}) has the lowest KLD of the {len(fitting)} variant(s) that fit "
           f"{human(budget)} at ctx {ctx}: KLD {pick['kld']:.4g}, PPL {pick['ppl']:.4g}, same top p "
           f"{100 * pick['same_top']:.1f}%; it needs {human(pick['need'])} = {human(pick['weights'])} weights"
           f" + {human(kv)} KV cache (f16, {model['layers']} layers × {model['kv_heads']} KV heads × "
           f"{model['head_dim']} dims × {ctx} tokens)")  # fmt: skip
    why += (f" + {human(pick['overhead'])} runtime memory measured by bench --speed." if pick["overhead_measured"]
            else "; runtime buffers are not counted (run `orlik bench --speed` to measure them).")  # fmt: skip
    if better:
        b = min(better, key=lambda r: r["need"])  # the cheapest step up in quality
        why += f" {b['name']} would be better (KLD {b['kld']:.4g}) but needs {human(b['need'])}."
    return {"pick": pick["name"], "why": why, "budget": budget, "ctx": ctx, "text": text, "candidates": rows}
