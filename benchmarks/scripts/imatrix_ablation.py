"""Does a Polish-English imatrix help Polish? KLD against the F16 model on the Polish held-out text
at Q2_K and Q3_K_M: without an imatrix, with an English-only imatrix, and with the Polish-English
one, the two imatrices computed on calibration sets of the same token count and chunk count.

    python -m orlik.benchmarks.scripts.imatrix_ablation runs/tiny/fp16 [--tokens 24000] [--chunk 256]

KLD is llama.cpp's own: `llama-perplexity --kl-divergence` against logits saved from the F16 GGUF.
Every step goes through the `orlik` CLI (calibrate build / imatrix / quantize), so each is resumable.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from orlik.sysinfo import usable_cores

TYPES = ("Q2_K", "Q3_K_M")
ARMS = ("none", "en", "pl-en")
_KLD = re.compile(r"Mean\s+KLD:\s+([0-9.]+)\s+±\s+([0-9.]+)")
_TOP = re.compile(r"Same top p:\s+([0-9.]+)\s+±\s+([0-9.]+)\s+%")
_PPL = re.compile(r"Mean PPL\(Q\)\s+:\s+([0-9.]+)\s+±\s+([0-9.]+)")


def orlik(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "orlik", "--json", "-q", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"orlik {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def perplexity(args: list[str]) -> str:
    from orlik import llamacpp

    rc, log = llamacpp.run_tool("llama-perplexity", args)
    if rc != 0:
        raise SystemExit(f"llama-perplexity failed: {log.strip().splitlines()[-1]}")
    return log


def run(model: Path, work: Path, tokens: int, chunk: int, ctx: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    # 1. Two calibration sets with the same token budget: English only, and the Polish-leaning mix.
    sets = {"en": ("en", work / "calib-en"), "pl-en": ("mixed", work / "calib-pl-en")}
    cards = {}
    for arm, (lang, d) in sets.items():
        if not (d / "card.json").is_file():
            orlik("calibrate", "build", str(model), "--out", str(d), "--tokens", str(tokens), "--lang", lang)
        cards[arm] = json.loads((d / "card.json").read_text())
    # 2. The imatrices, on the same number of chunks (llama-imatrix uses whole chunks only).
    chunks = tokens // chunk - 1
    imatrices = {}
    for arm, (lang, d) in sets.items():
        res = orlik("calibrate", "imatrix", str(model), "--calib", str(d), "--lang", lang, "--chunk", str(chunk),
                    "--chunks", str(chunks), "--out", str(work / f"imatrix-{arm}.gguf"))  # fmt: skip
        imatrices[arm] = res
    if len({r["chunks"] for r in imatrices.values()}) != 1:
        raise SystemExit(
            f"the imatrices saw different chunk counts: { {a: r['chunks'] for a, r in imatrices.items()} }"
        )
    # 3. The variants.
    variants: dict[tuple[str, str], Path] = {}
    for arm in ARMS:
        out = work / f"variants-{arm}"
        extra = [] if arm == "none" else ["--imatrix", imatrices[arm]["out"]]
        recipes = [t if arm == "none" else f"{t}-imat" for t in TYPES]
        res = orlik(
            "quantize", str(model), *[x for r in recipes for x in ("--recipe", r)], "--out", str(out), *extra
        )
        for t, row in zip(TYPES, res["variants"], strict=True):
            variants[(t, arm)] = Path(row["path"]) / "model.gguf"
    # 4. KLD on the Polish held-out text against the F16 logits.
    rows = _kld_rows(model, work, variants, ctx)
    return {
        "model": str(model),
        "heldout": "corpus.heldout_text('pl')",
        "ctx": ctx,
        "imatrix_chunk": chunk,
        "imatrix_chunks": chunks,
        "calibration_tokens": {a: c["result"]["tokens"] for a, c in cards.items()},
        "calibration_tokens_by_lang": {a: c["result"]["tokens_by_lang"] for a, c in cards.items()},
        "rows": rows,
    }


def _kld_rows(
    model: Path, work: Path, variants: dict[tuple[str, str], Path], ctx: int
) -> list[dict[str, Any]]:
    """llama-perplexity's KLD of each variant against the F16 GGUF's logits on the Polish held-out text."""
    from orlik import corpus
    from orlik.checkpoint import Checkpoint
    from orlik.gguf_convert import f16_gguf

    threads = str(usable_cores())
    text = work / "heldout-pl.txt"
    text.write_text(corpus.heldout_text("pl"), encoding="utf-8")
    f16 = f16_gguf(Checkpoint.open(model))
    base = work / f"f16-logits-c{ctx}.kld"
    common = ["-f", str(text), "-c", str(ctx), "-b", str(ctx), "-t", threads]
    if not base.is_file():
        perplexity(["-m", str(f16), *common, "--kl-divergence-base", str(base)])
    rows = []
    for (t, arm), gguf in variants.items():
        log = perplexity(["-m", str(gguf), *common, "--kl-divergence-base", str(base), "--kl-divergence"])
        k, top, ppl = _KLD.search(log), _TOP.search(log), _PPL.search(log)
        if not k:
            raise SystemExit(f"no KLD in llama-perplexity's output for {gguf}")
        rows.append({"type": t, "imatrix": arm, "kld": float(k.group(1)), "kld_se": float(k.group(2)),
                     "same_top_p": float(top.group(1)) if top else None,
                     "ppl": float(ppl.group(1)) if ppl else None})  # fmt: skip
    return rows


def table(res: dict[str, Any]) -> str:
    lines = [
        f"KLD vs F16 on the Polish held-out text (llama-perplexity --kl-divergence, ctx {res['ctx']}); "
        f"imatrices: {res['imatrix_chunks']} chunks x {res['imatrix_chunk']} tokens each",
        "",
        "| type | no imatrix | English imatrix | Polish-English imatrix |",
        "|---|---|---|---|",
    ]
    for t in TYPES:
        cells = []
        for arm in ARMS:
            r = next(r for r in res["rows"] if r["type"] == t and r["imatrix"] == arm)
            cells.append(f"{r['kld']:.4f} ± {r['kld_se']:.4f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="FP16 checkpoint")
    ap.add_argument("--work", type=Path, default=None, help="work dir [default: MODEL/../ablation]")
    ap.add_argument(
        "--tokens",
        type=int,
        default=24_000,
        help="tokens in each calibration set (the corpus holds ~24.6k English train tokens)",
    )
    ap.add_argument("--chunk", type=int, default=256, help="llama-imatrix chunk size")
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity context")
    a = ap.parse_args(argv)
    work = a.work or a.model.resolve().parent / "ablation"
    res = run(a.model, work, a.tokens, a.chunk, a.ctx)
    (work / "ablation.json").write_text(json.dumps(res, indent=2) + "\n")
    md = table(res)
    (work / "ablation.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
