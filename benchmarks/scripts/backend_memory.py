"""Peak memory while quantizing with the GPTQ, AWQ, HQQ and MLX backends, against the checkpoint's
FP16 safetensors size (target: <= 1.3x).

    python -m orlik.benchmarks.scripts.backend_memory runs/tiny/fp16
    python -m orlik.benchmarks.scripts.backend_memory runs/tiny/fp16 --synthetic small --recipe hqq-4bit-g64

Each recipe runs as `orlik quantize` in its own process, whose tree RSS is sampled every 20 ms.
Python, torch and the quantization library take a fixed few hundred MiB before any weight is
read, which swamps a tiny model; that floor is measured in a separate process that imports the
same libraries, and the figure judged against the target is the peak above it. Both are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orlik.benchmarks.scripts.quantize_memory import SYNTHETIC, _tree_rss, make_synthetic
from orlik.sysinfo import usable_cores

DEFAULT_RECIPES = ("gptq-w4g128", "awq-w4g128", "hqq-3bit-g64", "hqq-4bit-g64", "mlx-q4", "mlx-q3")
# What each backend imports before it reads a weight: the process floor for that backend.
LIBRARIES = {
    "gptq": ("torch", "transformers", "gptqmodel", "optimum"),
    "awq": ("torch", "transformers", "gptqmodel"),
    "hqq": ("torch", "transformers", "hqq.core.quantize", "accelerate"),
    "mlx": ("mlx.core", "mlx_lm", "transformers"),
}
TARGET = 1.3


def import_floor(fmt: str) -> int:
    """RSS of a fresh interpreter after importing orlik's CLI and the backend's libraries."""
    mods = ("orlik.cli", *LIBRARIES[fmt])
    code = "import importlib, psutil\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
    code += "print(psutil.Process().memory_info().rss)"
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", str(usable_cores())))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def write_calibration(out: Path, docs: int) -> Path:
    """A small calibration.jsonl in `orlik calibrate build`'s schema, from the corpus train split."""
    from orlik import corpus

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calibration.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(corpus.documents(split="train")):
            if i >= docs:
                break
            f.write(
                json.dumps({"text": d.text, "lang": d.lang, "domain": d.domain}, ensure_ascii=False) + "\n"
            )
    return out


def measure_one(
    checkpoint: Path, recipe: str, calib: Path, workdir: Path, interval: float = 0.02
) -> dict[str, Any]:
    import psutil

    out = workdir / "variants"
    cmd = [sys.executable, "-m", "orlik", "-q", "quantize", str(checkpoint), "--out", str(out),
           "--recipe", recipe, "--calib", str(calib), "--force"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, ORLIK_QUIET="1"))  # fmt: skip
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(root)[0])
        time.sleep(interval)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"orlik quantize --recipe {recipe} failed: {err.strip()[-800:]}")
    manifest = json.loads((out / recipe / "variant.json").read_text(encoding="utf-8"))
    shutil.rmtree(out, ignore_errors=True)
    return {"recipe": recipe, "format": manifest["format"], "peak_rss_bytes": peak, "seconds": round(time.time() - t0, 1),
            "variant_bytes": manifest["bytes"], "bpw": manifest["bpw"]}  # fmt: skip


def run(checkpoint: Path, recipes: list[str], calib: Path | None, calib_docs: int) -> dict[str, Any]:
    from orlik.checkpoint import Checkpoint

    fp16 = Checkpoint.open(checkpoint).weights_bytes
    rows = []
    floors: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="orlik-backend-memory-") as td:
        calib = calib or write_calibration(Path(td) / "calib", calib_docs)
        for r in recipes:
            row = measure_one(checkpoint, r, calib, Path(td))
            fmt = row["format"]
            if fmt not in floors:
                floors[fmt] = import_floor(fmt)
            above = max(0, row["peak_rss_bytes"] - floors[fmt])
            row.update(import_floor_bytes=floors[fmt], above_floor_bytes=above,
                       peak_ratio=round(row["peak_rss_bytes"] / fp16, 3), above_floor_ratio=round(above / fp16, 3),
                       within_target=above <= TARGET * fp16)  # fmt: skip
            rows.append(row)
    return {
        "checkpoint": str(checkpoint),
        "fp16_safetensors_bytes": fp16,
        "target_ratio": TARGET,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="FP16 checkpoint (or tokenizer source with --synthetic)")
    ap.add_argument("--recipe", action="append", default=None, help=f"default: {' '.join(DEFAULT_RECIPES)}")
    ap.add_argument("--calib", type=Path, default=None, help="calibration dir (default: corpus documents)")
    ap.add_argument("--calib-docs", type=int, default=32, help="documents in the default calibration set")
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="measure a random model of this shape")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args(argv)
    recipes = a.recipe or list(DEFAULT_RECIPES)
    if a.synthetic:
        with tempfile.TemporaryDirectory(prefix="orlik-synth-") as td:
            ckpt = make_synthetic(a.checkpoint, a.synthetic, Path(td) / a.synthetic)
            res = run(ckpt, recipes, a.calib, a.calib_docs)
            res["checkpoint"] = f"synthetic {a.synthetic} (random weights)"
    else:
        res = run(a.checkpoint, recipes, a.calib, a.calib_docs)
    mib = 2**20
    fp16 = res["fp16_safetensors_bytes"]
    print(
        f"checkpoint {res['checkpoint']}: FP16 safetensors {fp16 / mib:.1f} MiB; target peak <= {TARGET}x FP16"
    )
    print(f"{'recipe':<14}{'peak MiB':>10}{'floor MiB':>11}{'above MiB':>11}{'above/FP16':>12}{'peak/FP16':>11}"
          f"{'ok':>5}{'s':>8}")  # fmt: skip
    for r in res["rows"]:
        print(f"{r['recipe']:<14}{r['peak_rss_bytes'] / mib:>10.1f}{r['import_floor_bytes'] / mib:>11.1f}"
              f"{r['above_floor_bytes'] / mib:>11.1f}{r['above_floor_ratio']:>12.2f}{r['peak_ratio']:>11.2f}"
              f"{'yes' if r['within_target'] else 'NO':>5}{r['seconds']:>8.1f}")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
