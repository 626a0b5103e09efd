"""The eval report: eval.json and eval.md (accuracy ± stderr per task and variant, majority baseline),
the same columns added to bench's results.json and table.md, and KLD against mean accuracy drop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orlik.benchmarks.eval import TaskSpec, VariantScores
from orlik.fsutil import atomic_write_text

BEGIN, END = "<!-- orlik eval: begin -->", "<!-- orlik eval: end -->"
FP16 = "FP16"


def results(
    model: str, specs: list[TaskSpec], scores: list[VariantScores], settings: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": model, "settings": settings,
        "tasks": {s.name: {"items": len(s.labels()), "classes": len(s.choices), "majority": s.majority(),
                           "yaml": str(s.yaml)} for s in specs},
        "variants": [{"name": v.name, "seconds": v.seconds, "mean_acc": v.mean(),
                      "tasks": {t: {"acc": x.acc, "stderr": x.stderr, "n": x.n} for t, x in v.tasks.items()}}
                     for v in scores],
    }  # fmt: skip


def _bench_rows(bench: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """name -> (bytes, KLD) from bench's results.json, on its combined text when it has several."""
    if not bench:
        return {}
    texts = list(bench.get("texts", {}))
    key = "all" if len(texts) > 1 else (texts[0] if texts else "")
    out = {}
    for v in bench.get("variants", []):
        row = v.get("rows", {}).get(key, {})
        out[v["name"]] = {"bytes": v.get("bytes"), "kld": row.get("kld"), "kld_err": row.get("kld_err")}
    return out


def _pct(x: float, e: float | None = None) -> str:
    return f"{100 * x:.1f}" + (f" ± {100 * e:.1f}" if e is not None else "")


def table_md(res: dict[str, Any], bench: dict[str, Any] | None) -> str:
    tasks = list(res["tasks"])
    kb = _bench_rows(bench)
    ref = next((v for v in res["variants"] if v["name"] == FP16), None)
    head = ["variant", "size MiB", "KLD", *tasks, "mean", "Δ mean vs FP16", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for v in res["variants"]:
        b = kb.get(v["name"], {})
        size = f"{b['bytes'] / 2**20:.2f}" if b.get("bytes") else "–"
        kld = f"{b['kld']:.3g} ± {b['kld_err'] or 0:.2g}" if b.get("kld") and v["name"] != FP16 else "–"
        cells = [_pct(v["tasks"][t]["acc"], v["tasks"][t]["stderr"]) for t in tasks]
        drop = _pct(ref["mean_acc"] - v["mean_acc"]) if ref and v is not ref else "–"
        lines.append(
            "| "
            + " | ".join([v["name"], size, kld, *cells, _pct(v["mean_acc"]), drop, f"{v['seconds']:.0f}"])
            + " |"
        )
    base = [_pct(res["tasks"][t]["majority"]) for t in tasks]
    mean_base = sum(res["tasks"][t]["majority"] for t in tasks) / max(len(tasks), 1)
    lines.append("| " + " | ".join(["majority class", "", "", *base, _pct(mean_base), "", ""]) + " |")
    return "\n".join(lines)


def markdown(res: dict[str, Any], bench: dict[str, Any] | None) -> str:
    s = res["settings"]
    return "\n".join([
        f"## Polish task accuracy: {res['model']}", "",
        f"Accuracy in % ± its standard error, by lm-eval {s.get('lm_eval', '')} (`local-completions`, "
        f"{s['num_concurrent']} requests in flight) through each variant's OpenAI-compatible endpoint; "
        "KLD from bench. The last row answers every item with the task's most frequent label.", "",
        table_md(res, bench), "",
    ])  # fmt: skip


def merge_into_bench(out: Path, res: dict[str, Any], md: str) -> bool:
    """Add the accuracy columns to bench's results.json and table.md in `out` (if bench has run)."""
    rj, tm = out / "results.json", out / "table.md"
    if not rj.is_file():
        return False
    bench = json.loads(rj.read_text(encoding="utf-8"))
    by_name = {v["name"]: v for v in res["variants"]}
    for v in bench.get("variants", []):
        if v["name"] in by_name:
            v["eval"] = by_name[v["name"]]
    bench["eval"] = {"tasks": res["tasks"], "settings": res["settings"]}
    atomic_write_text(rj, json.dumps(bench, indent=2, ensure_ascii=False, default=str) + "\n")
    if tm.is_file():
        text = tm.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            text = (
                text[: text.index(BEGIN)].rstrip("\n")
                + "\n"
                + text[text.index(END) + len(END) :].lstrip("\n")
            )
        atomic_write_text(tm, text.rstrip("\n") + f"\n\n{BEGIN}\n{md}{END}\n")
    return True


def plot(res: dict[str, Any], bench: dict[str, Any] | None, path: Path) -> bool:
    """KLD (bench) against the mean accuracy drop from FP16, one point per quantized variant."""
    kb = _bench_rows(bench)
    ref = next((v for v in res["variants"] if v["name"] == FP16), None)
    pts = [(kb[v["name"]]["kld"], 100 * (ref["mean_acc"] - v["mean_acc"]), v["name"])
           for v in res["variants"] if ref and v is not ref and kb.get(v["name"], {}).get("kld") is not None]  # fmt: skip
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for x, y, name in pts:
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("KLD vs FP16 (bench, log scale)")
    ax.set_ylabel("mean accuracy drop vs FP16 (points)")
    ax.set_title(f"{res['model']}: KLD and Polish task accuracy")
    fig.tight_layout()
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def write(out: Path, res: dict[str, Any]) -> list[str]:
    """eval.json, eval.md, the bench columns and kld_accuracy.png in `out`; the names written."""
    out.mkdir(parents=True, exist_ok=True)
    rj = out / "results.json"
    bench = json.loads(rj.read_text(encoding="utf-8")) if rj.is_file() else None
    md = markdown(res, bench)
    atomic_write_text(out / "eval.json", json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "eval.md", md)
    written = ["eval.json", "eval.md"]
    if merge_into_bench(out, res, md):
        written += ["results.json", "table.md"]
    if plot(res, bench, out / "kld_accuracy.png"):
        written.append("kld_accuracy.png")
    return written
