"""Peak memory and speed of `orlik data clean` and `orlik train merge|upscale`, each run as its own
process (the peak is wait4's ru_maxrss of that process alone).

    python -m orlik.benchmarks.scripts.surgery_memory clean --megabytes 100
    python -m orlik.benchmarks.scripts.surgery_memory merge TOKENIZER_SOURCE --shape medium   # ~574M random

clean: a dirty corpus of the project's sentences with known damage (training/data/synth.py), at
two sizes, to show that memory does not grow with the input. merge: two random-weight FP16 llama
checkpoints of a synthetic shape (as quantize_memory builds them, different seeds), merged 50/50,
and the first up-scaled; the peak is compared with the largest tensor and with one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orlik.benchmarks.scripts.quantize_memory import SYNTHETIC


def _run(cmd: list[str]) -> dict[str, Any]:
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, ORLIK_QUIET="1"))  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed: {err.strip()[-400:]}")
    return {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": out}  # fmt: skip


def bench_clean(megabytes: list[float], work: Path) -> dict[str, Any]:
    from orlik.training.data import synth

    rows = []
    for mb in megabytes:
        src = work / f"web-{mb:g}mb.jsonl"
        injected = synth.write(src, megabytes=mb, seed=0)
        r = _run([sys.executable, "-m", "orlik", "--json", "data", "clean", str(src), "--out",
                  str(work / f"clean-{mb:g}.jsonl")])  # fmt: skip
        rep = json.loads(r.pop("stdout"))
        size = src.stat().st_size
        rows.append({"input_bytes": size, **r, "mb_per_s_wall": round(size / 1e6 / r["seconds"], 2),
                     "mb_per_s_cpu": round(size / 1e6 / r["cpu_seconds"], 2), "docs_in": rep["docs_in"],
                     "docs_out": rep["docs_out"], "dropped": rep["dropped"], "injected": injected})  # fmt: skip
    return {"clean": rows}


def make_random(tokenizer_from: Path, shape: str, seed: int, out: Path) -> Path:
    code = f"""
import json, shutil, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
src, out = Path({str(tokenizer_from)!r}), Path({str(out)!r})
cfg = json.loads((src / "config.json").read_text())
for k in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "head_dim"):
    cfg.pop(k, None)
cfg.update({SYNTHETIC[shape]!r})
torch.manual_seed({seed})
LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float16).save_pretrained(out)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, out / f.name)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return out


def bench_merge(tokenizer_from: Path, shape: str, work: Path) -> dict[str, Any]:
    from orlik.checkpoint import Checkpoint
    from orlik.training import tensorio

    a, b = (make_random(tokenizer_from, shape, s, work / f"m{s}") for s in (0, 1))
    ckpt = Checkpoint.open(a)
    largest = max(t.nbytes for t in tensorio.checkpoint_tensors(ckpt.weight_files).values())
    floor = _run(
        [sys.executable, "-c", "import torch, orlik.cli, orlik.training.merge, orlik.training.upscale"]
    )
    merge = _run(
        [sys.executable, "-m", "orlik", "-q", "train", "merge", str(a), str(b), "--out", str(work / "mm")]
    )
    n = ckpt.config["num_hidden_layers"]
    up = _run([sys.executable, "-m", "orlik", "-q", "train", "upscale", str(a), "--layers",
               f"0-{n * 3 // 4 - 1},{n // 4}-{n - 1}", "--out", str(work / "up")])  # fmt: skip
    for r in (floor, merge, up):
        r.pop("stdout")
    return {"shape": shape, "parameters": ckpt.weights_bytes // 2, "fp16_bytes": ckpt.weights_bytes,
            "largest_tensor_bytes": largest, "import_floor": floor, "merge_2_inputs": merge,
            "upscale": up, "merge_above_floor_bytes": merge["peak_rss_bytes"] - floor["peak_rss_bytes"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("clean")
    c.add_argument("--megabytes", type=float, nargs="+", default=[25.0, 100.0])
    m = sub.add_parser("merge")
    m.add_argument("tokenizer_from", type=Path, help="a checkpoint whose config and tokenizer to reuse")
    m.add_argument("--shape", choices=sorted(SYNTHETIC), default="medium")
    for p in (c, m):
        p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="orlik-surgery-") as td:
        res = bench_clean(a.megabytes, Path(td)) if a.what == "clean" else bench_merge(
            a.tokenizer_from, a.shape, Path(td))  # fmt: skip
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
