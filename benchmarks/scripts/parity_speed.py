"""Benchmark: orlik's full Table-8 pass on one GGUF variant against llama-perplexity
--kl-divergence including its base-logits pass, on the same text, ctx and threads, in one run.

    python -m orlik.benchmarks.scripts.parity_speed runs/tiny/fp16 runs/tiny/variants/Q4_K_M [--ctx 512] [--threads 2]

Each repetition times, back to back (so machine load drifts alike for both):
  llama.cpp      llama-perplexity on the F16 GGUF writing its base log-probs, then --kl-divergence on the variant
  orlik auto     `orlik bench` from a cold start (new process, no cached reference)
  orlik topk     `orlik bench --reference topk`, cold (builds the compact reference) and warm (reuses it)
and prints the ratios to llama.cpp, the figures both report, and the sizes of the two reference files.
Not a test: timings depend on the machine. The F16 GGUF conversion is done once, untimed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orlik import llamacpp
from orlik.benchmarks.speed import machine
from orlik.checkpoint import Checkpoint
from orlik.gguf_convert import f16_gguf
from orlik.manifest import Variant
from orlik.serving.runtimes.llamacpp import gguf_file
from orlik.sysinfo import usable_cores

_LLAMA = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "kld": r"Mean\s+KLD:\s*([\d.eE+-]+)",
          "same_top": r"Same top p:\s*([\d.]+)"}  # fmt: skip


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{(r.stderr or r.stdout)[-2000:]}")
    return dt, r.stdout + r.stderr


def run_llama(base: Path, quant: Path, text: Path, ctx: int, threads: int, work: Path) -> dict[str, Any]:
    tool = str(llamacpp.tool("llama-perplexity"))
    logits = work / "base.kld"
    t_base, _ = _timed([tool, "-m", str(base), "-f", str(text), "-c", str(ctx), "-t", str(threads),
                        "--kl-divergence-base", str(logits)])  # fmt: skip
    t_kld, out = _timed([tool, "-m", str(quant), "-c", str(ctx), "-t", str(threads), "--kl-divergence-base",
                         str(logits), "--kl-divergence"])  # fmt: skip
    # llama.cpp's log thread is not always drained at exit; the time counts, lost figures print as nan.
    vals = {k: float(m.group(1)) for k, p in _LLAMA.items() if (m := re.search(p, out))}
    size = logits.stat().st_size
    logits.unlink()
    return {
        "seconds": t_base + t_kld,
        "base_seconds": t_base,
        "kld_seconds": t_kld,
        "base_file_bytes": size,
        **vals,
    }


def run_orlik(
    model: Path, variant: Path, text: Path, ctx: int, threads: int, out: Path, mode: str
) -> dict[str, Any]:
    orlik = [sys.executable, "-m", "orlik"]
    dt, _ = _timed([*orlik, "-q", "--json", "bench", str(model), str(variant), "--text", str(text), "--ctx", str(ctx),
                    "--threads", str(threads), "--out", str(out), "--reference", mode, "--no-cards",
                    "--no-verify"])  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    row = res["variants"][1]["rows"][next(iter(res["texts"]))]
    ref = next(iter(res["texts"].values()))["reference"] or {}
    return {"seconds": dt, "ppl": row["ppl"], "kld": row["kld"], "same_top": 100 * row["same_top"],
            "kld_mode": res["settings"]["kld_mode"], "reference_bytes": ref.get("bytes"),
            "scored_tokens": row["tokens"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m orlik.benchmarks.scripts.parity_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("model", type=Path, help="FP16 checkpoint directory")
    ap.add_argument("variant", type=Path, help="GGUF variant directory")
    ap.add_argument(
        "--text", type=Path, default=None, help="UTF-8 text (default: the corpus held-out split, pl+en)"
    )
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)

    ckpt = Checkpoint.open(a.model)
    quant = gguf_file(Variant.load(a.variant))
    base = f16_gguf(ckpt)  # untimed: both sides start from converted files
    with tempfile.TemporaryDirectory(prefix="orlik-parity-speed-") as tmp:
        work = Path(tmp)
        text = a.text
        if text is None:
            from orlik import corpus

            text = work / "heldout.txt"
            text.write_text("\n\n".join(corpus.heldout_text(lang) for lang in corpus.LANGS), encoding="utf-8")
        runs: dict[str, list[dict[str, Any]]] = {"llama.cpp": [], "orlik auto (cold)": [], "orlik topk (cold)": [],
                                                 "orlik topk (warm)": []}  # fmt: skip
        for r in range(a.reps):
            print(f"repetition {r + 1}/{a.reps} ...", file=sys.stderr, flush=True)
            runs["llama.cpp"].append(run_llama(base, quant, text, a.ctx, a.threads, work))
            for mode in ("auto", "topk"):
                out = work / f"out-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                runs[f"orlik {mode} (cold)"].append(
                    run_orlik(a.model, a.variant, text, a.ctx, a.threads, out, mode)
                )
            runs["orlik topk (warm)"].append(run_orlik(a.model, a.variant, text, a.ctx, a.threads,
                                                       work / "out-topk", "topk"))  # fmt: skip
    ref_s = statistics.median(x["seconds"] for x in runs["llama.cpp"])
    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores; threads {a.threads}; ctx {a.ctx}; "
          f"{runs['orlik auto (cold)'][0]['scored_tokens']:,} scored tokens; median of {a.reps}")  # fmt: skip
    print(
        f"{'':<20} {'seconds':>8} {'× llama':>8} {'PPL':>10} {'KLD':>10} {'same top %':>10}  reference file"
    )
    for name, xs in runs.items():
        s = statistics.median(x["seconds"] for x in xs)
        x = xs[-1]
        ref = x.get("base_file_bytes") or x.get("reference_bytes")
        mode = f" [{x['kld_mode']}]" if "kld_mode" in x else ""
        print(f"{name:<20} {s:8.1f} {s / ref_s:8.2f} {x.get('ppl', float('nan')):10.4f} "
              f"{x.get('kld', float('nan')):10.6f} {x.get('same_top', float('nan')):10.3f}  "
              f"{(ref or 0) / 2**20:.1f} MiB{mode}")  # fmt: skip


if __name__ == "__main__":
    main()
