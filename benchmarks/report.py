"""The Table 8 report: reports/table.md (the paper's columns plus format), table.csv, results.json,
and the same table printed with rich."""

from __future__ import annotations

import csv
import io
import json
import math
import platform
from pathlib import Path
from typing import Any

from orlik.checkpoint import Checkpoint
from orlik.fsutil import atomic_write_text
from orlik.sysinfo import package_version

GIB = 1 << 30
MIB = 1 << 20
HEADER = (
    "Variant",
    "Format",
    "Size [GiB]",
    "PPL",
    "ΔPPL",
    "KLD",
    "Mean Δp [%]",
    "RMS Δp [%]",
    "Same top p [%]",
)


def tool_versions() -> dict[str, str]:
    from orlik import __version__, llamacpp

    out = {"orlik": __version__, "python": platform.python_version()}
    for dist in ("numpy", "torch", "transformers", "llama_cpp_python"):
        if (v := package_version(dist)) is not None:
            out[dist] = v
    if "llama_cpp_python" in out:
        out["llama.cpp"] = llamacpp.build_info()
    return out


def model_facts(ckpt: Checkpoint) -> dict[str, Any]:
    """What recommend needs to size the KV cache, and what identifies the checkpoint."""
    c = ckpt.config
    heads = int(c.get("num_attention_heads") or 1)
    return {
        "name": ckpt.name,
        "path": str(ckpt.path),
        "hash": ckpt.hash,
        "arch": ckpt.arch,
        "bytes": ckpt.weights_bytes,
        "layers": int(c.get("num_hidden_layers") or 0),
        "kv_heads": int(c.get("num_key_value_heads") or heads),
        "head_dim": int(c.get("head_dim") or int(c.get("hidden_size") or 0) // heads),
        "vocab": int(c.get("vocab_size") or 0),
        "max_context": int(c.get("max_position_embeddings") or 0),
    }


def fmt_pm(v: float | None, e: float | None = None, scale: float = 1.0) -> str:
    """value ± error, the error to two significant digits and the value to the same place; values
    below 1e-3 share a power of ten, "(8.04 ± 0.15)e-05", so small KLDs stay readable."""
    if v is None or not math.isfinite(v):
        return "–"
    v *= scale
    if e is None or not math.isfinite(e) or e <= 0:
        return f"{v:.4g}" if v != int(v) or abs(v) >= 1e6 else f"{v:.1f}"
    e *= scale
    p = math.floor(math.log10(abs(v))) if v else 0
    if p < -3 and e < abs(v):
        v, e = v / 10.0**p, e / 10.0**p
        d = max(0, 1 - math.floor(math.log10(e)))
        return f"({v:.{d}f} ± {e:.{d}f})e{p:03d}"
    d = max(0, 1 - math.floor(math.log10(e)))
    return f"{v:.{d}f} ± {e:.{d}f}"


def fmt_size(nbytes: int) -> str:
    g = nbytes / GIB
    return f"{g:.2f}" if g >= 1 else f"{g:.3g}"


def texts_in_order(results: dict[str, Any]) -> list[str]:
    names = list(results["texts"])
    return (["all"] if len(names) > 1 else []) + names


def table_cells(v: dict[str, Any], text: str) -> list[str]:
    r = v["rows"][text]
    cells = [v["name"], v["format"], fmt_size(v["bytes"]), fmt_pm(r["ppl"], r["ppl_err"])]
    if v["format"] == "fp16":
        return [*cells, "–", "–", "–", "–", "–"]
    return [*cells, fmt_pm(r["dppl"], r["dppl_err"]), fmt_pm(r["kld"], r["kld_err"]),
            fmt_pm(r["dp_mean"], r["dp_mean_err"], 100), fmt_pm(r["dp_rms"], r["dp_rms_err"], 100),
            fmt_pm(r["same_top"], r["same_top_err"], 100)]  # fmt: skip


def _md_table(header: list[str] | tuple[str, ...], rows: list[list[str]], left: int = 2) -> str:
    align = ["---"] * left + ["--:"] * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _text_title(results: dict[str, Any], name: str) -> str:
    if name == "all":
        return "All texts (" + " + ".join(results["texts"]) + ")"
    t = results["texts"][name]
    return f"{name}: {t['source']}"


def markdown(results: dict[str, Any]) -> str:
    m, s = results["model"], results["settings"]
    scored = sum(t["scored_tokens"] for t in results["texts"].values())
    sizes = ", ".join(f"{k} {t['tokens']:,} tokens" for k, t in results["texts"].items())
    out = [f"# Table 8: {m['name']} variants against FP16", "",
           f"Same tokens for every variant: {sizes}; "
           f"chunks of {s['ctx']} tokens, the last {s['scored_positions_per_chunk']} predictions of each scored "
           f"({scored:,} in all). Statistics and uncertainties (±1σ) as llama-perplexity --kl-divergence computes them; "
           f"FP16 through {s.get('fp16_engine', 'transformers')}, each variant through its serving runtime.", ""]  # fmt: skip
    for name in texts_in_order(results):
        out += [f"## {_text_title(results, name)}", ""]
        out += [_md_table(HEADER, [table_cells(v, name) for v in results["variants"]]), ""]
    out += distributions_md(results)
    if any(v.get("speed") for v in results["variants"]):
        out += speed_md(results)
    out += notes_md(results)
    return "\n".join(out) + "\n"


def distributions_md(results: dict[str, Any]) -> list[str]:
    name = texts_in_order(results)[0]
    quants = [v for v in results["variants"] if v["format"] != "fp16"]
    kp = list(quants[0]["rows"][name]["kld_percentiles"]) if quants else []
    dp = list(quants[0]["rows"][name]["dp_percentiles"]) if quants else []
    rows_k = [
        [v["name"], v["format"], *(f"{v['rows'][name]['kld_percentiles'][p]:.4g}" for p in kp)]
        for v in quants
    ]
    rows_p = [
        [v["name"], v["format"], *(f"{100 * v['rows'][name]['dp_percentiles'][p]:.3g}" for p in dp)]
        for v in quants
    ]
    rows_r = [[v["name"], v["format"], fmt_pm(v["rows"][name]["ppl_ratio"], v["rows"][name]["ppl_ratio_err"]),
               fmt_pm(v["rows"][name]["ln_ppl_ratio"], v["rows"][name]["ln_ppl_ratio_err"]),
               f"{100 * v['rows'][name]['cor_ln_ppl']:.2f}"] for v in quants]  # fmt: skip
    return [f"## Distributions ({name})", "", "KLD percentiles:", "",
            _md_table(["Variant", "Format", *kp], rows_k), "", "Δp percentiles [%]:", "",
            _md_table(["Variant", "Format", *dp], rows_p), "",
            _md_table(["Variant", "Format", "PPL(Q)/PPL(FP16)", "ln(PPL(Q)/PPL(FP16))", "Cor(ln PPL) [%]"], rows_r),
            ""]  # fmt: skip


def _ratio(sp: dict[str, Any], base: dict[str, Any], key: str) -> str:
    return f"{sp[key] / base[key]:.2f}×" if base.get(key) else "–"


def speed_md(results: dict[str, Any]) -> list[str]:
    mach = results["machine"]
    base = (results["variants"][0].get("speed") or {}) if results["variants"] else {}
    rows = []
    for v in results["variants"]:
        sp = v.get("speed") or {}
        if "error" in sp or not sp:
            rows.append([v["name"], v["format"], "–", f"{v['bytes'] / MIB:.1f}", f"{v['bpw']:.2f}",
                         *["–"] * 7])  # fmt: skip
            continue
        rows.append([v["name"], v["format"], sp["runtime"], f"{v['bytes'] / MIB:.1f}", f"{v['bpw']:.2f}",
                     f"{sp['prompt_tps']:.0f}", _ratio(sp, base, "prompt_tps"), f"{sp['decode_tps']:.1f}",
                     _ratio(sp, base, "decode_tps"),
                     f"{1000 * sp['ttft_s']:.0f}", f"{sp['peak_rss_load_bytes'] / MIB:.0f}",
                     f"{sp['peak_rss_gen_bytes'] / MIB:.0f}"])  # fmt: skip
    threads = {str((v.get("speed") or {}).get("threads")) for v in results["variants"] if v.get("speed")}
    head = ["Variant", "Format", "Runtime", "File [MiB]", "bpw", "Prompt tok/s", "× FP16", "Decode tok/s",
            "× FP16", "TTFT [ms]", "Peak RSS load [MiB]", "Peak RSS gen [MiB]"]  # fmt: skip
    return ["## Speed and memory", "",
            f"Measured on {mach['cpu']} ({mach['cores']} cores, {mach['memory_bytes'] / GIB:.0f} GiB RAM, {mach['os']}), "
            f"threads {', '.join(sorted(threads))}; one child process per model, one after another. Prompt: "
            f"{base.get('prompt_tokens', 512)} tokens of the evaluation text (tok/s = prompt / time to first token); "
            f"decode: {base.get('gen_tokens', 128)} greedy tokens; medians of {base.get('reps', 3)} runs. Peak RSS "
            "is the process's high-water mark (VmHWM) after loading, then restarted for generation alone; both include "
            "the Python interpreter and the runtime's libraries.", "",
            _md_table(head, rows), ""]  # fmt: skip


def notes_md(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    lines = ["## How the KLD was computed", ""]
    refs = {k: t["reference"] for k, t in results["texts"].items() if t.get("reference")}
    if refs:
        size = sum(r["bytes"] for r in refs.values())
        mean_k = ", ".join(f"{k} {r['mean_k']:.0f}" for k, r in refs.items())
        lines.append(f"- FP16 reference: top-K log-probs per scored token (K adaptive, left-out mass <= "
                     f"{s['tail_mass']:g}, K <= {s['kmax']}) plus the exact left-out mass and Σp·log p; "
                     f"{size / MIB:.1f} MiB for {sum(t['scored_tokens'] for t in results['texts'].values()):,} "
                     f"scored tokens (mean K {mean_k}).")  # fmt: skip
    lines.append(f"- KLD computed `{s['kld_mode']}` ({s['kld_mode_why']}). `exact`: FP16 logits streamed beside the "
                 "variants, KLD over the full vocabulary. `topk`: against the compact reference; the estimate is exact "
                 "for the kept tokens and bounds the left-out tail, and the true mean KLD lies in [lo, hi] below.")  # fmt: skip
    for v in results["variants"] if s["kld_mode"] == "topk" else []:
        if v["format"] == "fp16":
            continue
        parts = []
        for name, r in v["rows"].items():
            if name == "all" and len(v["rows"]) > 1:
                continue
            parts.append(f"{name}: {r['mode']}" + (f" (KLD in [{r['kld_lo']:.4g}, {r['kld_hi']:.4g}])"
                                                  if r["mode"] == "topk" else ""))  # fmt: skip
        lines.append(f"- {v['name']}: " + "; ".join(parts))
    lines += _mismatch_notes(results)
    if results.get("overlap"):
        o = results["overlap"]
        worst = max(t["fraction"] for t in o["texts"].values())
        lines.append(f"- Overlap with the calibration set {o['calibration']}: at most {100 * worst:.2f}% of "
                     f"{o['ngram']}-word sequences (limit {100 * o['max_fraction']:g}%).")  # fmt: skip
    return [*lines, ""]


def _mismatch_notes(results: dict[str, Any]) -> list[str]:
    """A note for each variant whose own tokenizer splits a text differently from the shared ids."""
    lines = []
    for v in results["variants"]:
        shares = {t: x for t, x in (v.get("token_mismatch") or {}).items() if x > 0}
        if shares:
            each = "; ".join(f"{t} {100 * x:.2f}%" for t, x in shares.items())
            lines.append(f"- {v['name']} is scored on the FP16 reference's token ids, but its own tokenizer splits "
                         f"the text differently ({each} of the tokens differ): served, it sees its own split.")  # fmt: skip
    return lines


CSV_FIELDS = ("ppl", "ppl_err", "ppl_base", "dppl", "dppl_err", "ppl_ratio", "ppl_ratio_err", "ln_ppl_ratio",
              "ln_ppl_ratio_err", "cor_ln_ppl", "kld", "kld_err", "kld_lo", "kld_hi", "dp_mean", "dp_mean_err",
              "dp_rms", "dp_rms_err", "same_top", "same_top_err", "tokens", "mode")  # fmt: skip
SPEED_FIELDS = ("prompt_tps", "decode_tps", "ttft_s", "peak_rss_load_bytes", "peak_rss_gen_bytes", "threads")


def csv_text(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "variant", "format", "bytes", "size_gib", "bpw", *CSV_FIELDS, *SPEED_FIELDS])
    for name in texts_in_order(results):
        for v in results["variants"]:
            r, sp = v["rows"][name], v.get("speed") or {}
            w.writerow([name, v["name"], v["format"], v["bytes"], f"{v['bytes'] / GIB:.6f}", f"{v['bpw']:.4f}",
                        *(r.get(k, "") for k in CSV_FIELDS), *(sp.get(k, "") for k in SPEED_FIELDS)])  # fmt: skip
    return buf.getvalue()


def write_json(results: dict[str, Any], out: Path) -> None:
    atomic_write_text(
        out / "results.json", json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n"
    )


def write_all(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", markdown(results))
    atomic_write_text(out / "table.csv", csv_text(results))
    write_json(results, out)


def print_table(results: dict[str, Any], text: str | None = None) -> None:
    """Table 8 for one text (default: all texts together) on stdout."""
    from rich.console import Console
    from rich.table import Table

    name = text or texts_in_order(results)[0]
    t = Table(
        title=f"Table 8 · {results['model']['name']} · {_text_title(results, name)} · ctx {results['settings']['ctx']}"
    )
    for i, h in enumerate(HEADER):
        t.add_column(h, justify="left" if i < 2 else "right", no_wrap=i >= 2)
    for v in results["variants"]:
        t.add_row(*table_cells(v, name))
    con = Console()
    if not con.is_terminal:
        con = Console(width=200)  # a pipe or a log file: do not squeeze the table into 80 columns
    con.print(t)
