"""pareto.png (size against KLD, log-log, the Pareto front marked, one colour per format) and
speed.png (prompt and decode throughput, peak memory) for the report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orlik.errors import MissingDependencyError

GIB = 1 << 30
MIB = 1 << 20
# One fixed colour per format, so every report colours a format the same way.
COLOURS = {"fp16": "#444444", "gguf": "#1f77b4", "gptq": "#ff7f0e", "awq": "#2ca02c", "hqq": "#d62728",
           "exl2": "#9467bd", "mlx": "#8c564b"}  # fmt: skip


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError('matplotlib is not installed; pip install "orlik[bench]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prewarm() -> None:
    """Import matplotlib in a background thread while the models run (about a second of start-up
    that would otherwise come after the scoring); errors surface later, in write_all."""
    import threading

    def load() -> None:
        try:
            _plt()
        except Exception:  # reported by write_all, which needs the library
            pass

    threading.Thread(target=load, name="orlik-matplotlib", daemon=True).start()


def pareto_front(points: list[tuple[float, float]], same_size: float = 0.005) -> list[int]:
    """Indices of the points no other point beats, by increasing size. Sizes within `same_size`
    (relative) count as equal, so a variant a few bytes smaller but worse does not join the front."""
    front: list[int] = []
    for i, (size, kld) in enumerate(points):
        beaten = any(j != i and s2 <= size * (1 + same_size) and (k2 < kld or (k2 == kld and s2 < size))
                     for j, (s2, k2) in enumerate(points))  # fmt: skip
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


# Where a label may go, in order: below right, above right, below left, above left of its point
# (offset in points, alignment); below right keeps it clear of the front's steps-post line.
_SPOTS = (((6, -6), "left", "top"), ((6, 6), "left", "bottom"), ((-6, -6), "right", "top"),
          ((-6, 6), "right", "bottom"))  # fmt: skip


def _repel(fig: Any, ax: Any, labels: list[Any], points: list[tuple[float, float]], r: float = 7.0) -> None:
    """Give each label (top to bottom) the first spot around its point where it overlaps no other
    label and no marker; if none is free, push it down from the first spot in small steps."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    px = r * fig.dpi / 72
    markers = [Bbox.from_extents(x - px, y - px, x + px, y + px) for x, y in ax.transData.transform(points)]
    taken: list[Any] = []  # boxes of the labels placed so far

    (dx0, dy0), ha0, va0 = _SPOTS[0]
    pushed_down = [((dx0, dy0 - 4 * step), ha0, va0) for step in range(1, 40)]
    for i in sorted(range(len(labels)), key=lambda i: -points[i][1]):
        lab = labels[i]
        others = [m for j, m in enumerate(markers) if j != i] + taken
        for (dx, dy), ha, va in (*_SPOTS, *pushed_down):
            lab.set_position((dx, dy))
            lab.set_ha(ha)
            lab.set_va(va)
            box = lab.get_window_extent(renderer).expanded(1.08, 1.15)
            if not any(box.overlaps(o) for o in others):
                break
        taken.append(lab.get_window_extent(renderer))


def _text(results: dict[str, Any]) -> str:
    names = list(results["texts"])
    return "all" if len(names) > 1 else names[0]


def is_auto(v: dict[str, Any]) -> bool:
    """A size-budgeted mix (`--recipe auto`, `mlx-auto`) rather than a fixed recipe."""
    return bool(((v.get("recipe") or {}).get("options") or {}).get("auto"))


def _kind(imatrix: bool, auto: bool) -> str:
    return "auto" if auto else "imat" if imatrix else "plain"


def pareto(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    text = _text(results)
    quants = [v for v in results["variants"] if v["format"] != "fp16"]
    fp16 = next((v for v in results["variants"] if v["format"] == "fp16"), None)
    floor = min((v["rows"][text]["kld"] for v in quants if v["rows"][text]["kld"] > 0), default=1e-6)
    # MiB for small models, so the axis reads 4, 6, 10 rather than 4e-3, 6e-3, 1e-2.
    unit, div = (
        ("GiB", GIB) if max((v["bytes"] for v in results["variants"]), default=0) >= GIB else ("MiB", MIB)
    )
    pts = [(v["bytes"] / div, max(v["rows"][text]["kld"], floor)) for v in quants]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=130)
    imat = [bool(v.get("imatrix_hash")) for v in quants]
    auto = [is_auto(v) for v in quants]
    _points(ax, quants, pts, text, imat, auto)
    front = _fronts(ax, pts, auto)
    labels = [ax.annotate(v["name"], pts[i], textcoords="offset points", xytext=(6, -6), va="top", fontsize=8.5,
                          fontweight="bold" if i in front else "normal") for i, v in enumerate(quants)]  # fmt: skip
    if fp16:
        ax.axvline(fp16["bytes"] / div, color=COLOURS["fp16"], ls="--", lw=1)
        ax.annotate("FP16 (KLD 0)", (fp16["bytes"] / div, floor), textcoords="offset points", xytext=(-4, 4),
                    rotation=90, ha="right", va="bottom", fontsize=8.5, color=COLOURS["fp16"])  # fmt: skip
    _pareto_axes(ax, results, text, unit)
    fig.tight_layout()
    fig.canvas.draw()
    _repel(fig, ax, labels, pts)
    _save(fig, path)


def _points(ax: Any, quants: list[dict[str, Any]], pts: list[tuple[float, float]], text: str, imat: list[bool],
            auto: list[bool]) -> None:  # fmt: skip
    """One error-bar series per format and kind."""
    # Marker: o plain, s with imatrix, * size-budgeted auto mix (types chosen per tensor by orlik).
    styles = (("plain", "o", 6.5, ""), ("imat", "s", 6.5, " + imatrix"), ("auto", "*", 11, " auto"))
    for fmt in dict.fromkeys(v["format"] for v in quants):
        for kind, marker, ms, tag in styles:
            idx = [i for i, v in enumerate(quants) if v["format"] == fmt and _kind(imat[i], auto[i]) == kind]
            if not idx:
                continue
            ax.errorbar([pts[i][0] for i in idx], [pts[i][1] for i in idx],
                        yerr=[quants[i]["rows"][text]["kld_err"] for i in idx], fmt=marker,
                        ms=ms, capsize=3, color=COLOURS.get(fmt, "#17becf"), zorder=3,
                        label=fmt.upper() + tag)  # fmt: skip


def _fronts(ax: Any, pts: list[tuple[float, float]], auto: list[bool]) -> list[int]:
    """Draw the Pareto front (and the fixed recipes' own, when auto variants are among them); return it."""
    front = pareto_front(pts)
    if any(auto) and not all(auto):
        # The front of the fixed recipes alone, beside the one auto variants join: the gap is what
        # measuring each tensor buys at equal size.
        stock = [i for i in range(len(pts)) if not auto[i]]
        sf = [stock[j] for j in pareto_front([pts[i] for i in stock])]
        ax.plot([pts[i][0] for i in sf], [pts[i][1] for i in sf], "--", color="#8a8a8a", lw=1.1,
                drawstyle="steps-post", zorder=1, label="Pareto front, fixed recipes")  # fmt: skip
    if front:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color="#2a2a2a", lw=1.2,
                drawstyle="steps-post", zorder=2, label="Pareto front" + (", with auto" if any(auto) else ""))  # fmt: skip
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=170, facecolors="none",
                   edgecolors="#2a2a2a", linewidths=1.3, zorder=4)  # fmt: skip
    return front


def _pareto_axes(ax: Any, results: dict[str, Any], text: str, unit: str) -> None:
    """Log axes with plain tick labels, titles, grid and legend."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda x, _: f"{x:g}")  # 4, 6, 10 rather than 4×10⁰
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel(f"Size [{unit}] (log scale)")
    ax.set_ylabel("Mean KLD against FP16 [nats] (log scale)")
    tokens = sum(t["scored_tokens"] for t in results["texts"].values())
    ax.set_title(f"{results['model']['name']}: size vs KLD ({text}, ctx {results['settings']['ctx']}, "
                 f"{tokens:,} scored tokens)\nlower-left is better; ringed points form the Pareto front", fontsize=10.5)  # fmt: skip
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper right", fontsize=9)


def speed(results: dict[str, Any], path: Path) -> bool:
    """Three panels: prompt tok/s, decode tok/s, peak RSS. False when nothing was measured."""
    rows = [v for v in results["variants"] if v.get("speed") and "error" not in v["speed"]]
    if not rows:
        return False
    plt = _plt()
    runtimes = {v["speed"]["runtime"] for v in rows}
    names = [v["name"] + (f" ({v['speed']['runtime']})" if len(runtimes) > 1 else "") for v in rows]
    colours = [COLOURS.get(v["format"], "#17becf") for v in rows]
    panels = [("Prompt processing [tok/s]", [v["speed"]["prompt_tps"] for v in rows], "{:.0f}"),
              ("Decode [tok/s]", [v["speed"]["decode_tps"] for v in rows], "{:.1f}"),
              ("Peak RSS during generation [MiB]", [v["speed"]["peak_rss_gen_bytes"] / MIB for v in rows], "{:.0f}")]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(rows) + 2.2), dpi=130, sharey=True)
    for ax, (title, vals, f) in zip(axes, panels, strict=True):
        y = range(len(rows))
        ax.barh(list(y), vals, color=colours)
        for yi, val in zip(y, vals, strict=True):
            ax.text(val, yi, " " + f.format(val), va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max(vals) * 1.25 if max(vals) > 0 else 1)
        ax.grid(True, axis="x", alpha=0.25)
    axes[0].set_yticks(range(len(rows)), names, fontsize=9)
    axes[0].invert_yaxis()
    m = results["machine"]
    threads = rows[0]["speed"].get("threads")
    fig.suptitle(f"{results['model']['name']}: speed and memory on {m['cpu']} ({m['cores']} cores, {threads} threads); "
                 "colour = format", fontsize=10.5)  # fmt: skip
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def write_all(results: dict[str, Any], out: Path) -> list[str]:
    written = []
    if any(v["format"] != "fp16" for v in results["variants"]):
        pareto(results, out / "pareto.png")
        written.append("pareto.png")
    if speed(results, out / "speed.png"):
        written.append("speed.png")
    return written
