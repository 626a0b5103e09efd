"""Peak memory of the whole GGUF quantize step (F16 conversion + llama-quantize, every child
process included) against the checkpoint's FP16 safetensors size. Target: <= 1.3x.

    python -m orlik.benchmarks.scripts.quantize_memory runs/tiny/fp16 --recipe Q4_K_M
    python -m orlik.benchmarks.scripts.quantize_memory runs/tiny/fp16 --synthetic small   # a ~100M model

`orlik quantize` runs as a subprocess with an empty GGUF cache, so the conversion is measured too.
The process tree's summed RSS is sampled every 20 ms (shared library pages are counted once per
process, so the figure errs high); wait4's largest single-process peak is the cross-check.
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

from orlik.quantize.backends.gptqmodel_driver import QUIET_LOGGERS

SYNTHETIC = {  # random-weight llama models of the training configs' shapes, for larger measurements
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4),
    "medium": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4),
}  # fmt: skip


def make_synthetic(tokenizer_from: Path, shape: str, out: Path) -> Path:
    """A random FP16 llama checkpoint of `shape` that reuses `tokenizer_from`'s tokenizer files."""
    code = f"""
import json, logging, shutil, sys, torch
from pathlib import Path
for name in {QUIET_LOGGERS!r}:  # import-time noise about CUDA-only kernels
    logging.getLogger(name).setLevel(logging.ERROR)
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar()
src, out = Path({str(tokenizer_from)!r}), Path({str(out)!r})
cfg = json.loads((src / "config.json").read_text())
for k in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "head_dim"):
    cfg.pop(k, None)
cfg.update({SYNTHETIC[shape]!r})
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float16)
model.save_pretrained(out)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, out / f.name)
"""
    # A separate process, so that building the model does not count against the measurement.
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def _tree_rss(root: Any) -> tuple[int, dict[str, int]]:
    import psutil

    total, by = 0, {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, {}
    for p in procs:
        try:
            rss = p.memory_info().rss
            name = _label(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += rss
        by[name] = by.get(name, 0) + rss
    return total, by


def _label(cmd: list[str]) -> str:
    for part in cmd:
        base = os.path.basename(part)
        if base.startswith("llama-") or base == "convert_hf_to_gguf.py":
            return base + (" --version" if "--version" in cmd else "")
    return "orlik (python)"


def measure(checkpoint: Path, recipes: list[str], interval: float = 0.02) -> dict[str, Any]:
    import psutil

    from orlik import llamacpp
    from orlik.checkpoint import Checkpoint

    ckpt = Checkpoint.open(checkpoint)
    with tempfile.TemporaryDirectory(prefix="orlik-memory-") as td:
        env = dict(os.environ, ORLIK_CACHE=str(Path(td) / "cache"), ORLIK_LLAMACPP=str(llamacpp.build_root()),
                   ORLIK_QUIET="1")  # fmt: skip
        cmd = [sys.executable, "-m", "orlik", "-q", "quantize", str(checkpoint), "--out", str(Path(td) / "v")]
        for r in recipes:
            cmd += ["--recipe", r]
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        root = psutil.Process(proc.pid)
        peak, peak_by, per_tool = 0, {}, {}
        while True:
            # wait4 on this child alone: its rusage covers it and its descendants, not the
            # process that built a synthetic model earlier.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            total, by = _tree_rss(root)
            if total > peak:
                peak, peak_by = total, by
            for k, v in by.items():
                per_tool[k] = max(per_tool.get(k, 0), v)
            time.sleep(interval)
        ru_max = usage.ru_maxrss * 1024  # KiB on Linux
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"orlik quantize failed: {err.strip()[-500:]}")
        seconds = time.time() - t0
        out_bytes = sum(p.stat().st_size for p in (Path(td) / "v").rglob("*.gguf"))
    fp16 = ckpt.weights_bytes
    return {
        "checkpoint": str(checkpoint),
        "parameters": fp16 // 2,
        "fp16_safetensors_bytes": fp16,
        "recipes": recipes,
        "peak_tree_rss_bytes": peak,
        "peak_ratio": round(peak / fp16, 3),
        "peak_by_process_at_peak": peak_by,
        "peak_by_process": per_tool,
        "largest_single_process_maxrss_bytes": ru_max,
        "single_process_ratio": round(ru_max / fp16, 3),
        "variants_bytes": out_bytes,
        "seconds": round(seconds, 1),
        "target_ratio": 1.3,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="FP16 checkpoint (or tokenizer source with --synthetic)")
    ap.add_argument("--recipe", action="append", default=None, help="recipe(s) to build (default Q4_K_M)")
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="measure a random model of this shape")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args(argv)
    recipes = a.recipe or ["Q4_K_M"]
    if a.synthetic:
        with tempfile.TemporaryDirectory(prefix="orlik-synth-") as td:
            ckpt = make_synthetic(a.checkpoint, a.synthetic, Path(td) / a.synthetic)
            res = measure(ckpt, recipes)
            res["checkpoint"] = f"synthetic {a.synthetic} (random weights)"
            shutil.rmtree(ckpt, ignore_errors=True)
    else:
        res = measure(a.checkpoint, recipes)
    mib = 2**20
    print(f"checkpoint        {res['checkpoint']}  ({res['parameters'] / 1e6:.1f}M parameters)")
    print(f"FP16 safetensors  {res['fp16_safetensors_bytes'] / mib:9.1f} MiB")
    print(f"peak RSS, tree    {res['peak_tree_rss_bytes'] / mib:9.1f} MiB  = {res['peak_ratio']:.2f}x FP16 "
          f"(target <= {res['target_ratio']}x)")  # fmt: skip
    print(f"peak RSS, 1 proc  {res['largest_single_process_maxrss_bytes'] / mib:9.1f} MiB  = "
          f"{res['single_process_ratio']:.2f}x FP16 (wait4 ru_maxrss)")  # fmt: skip
    for k, v in sorted(res["peak_by_process"].items()):
        print(f"  {k:<24}{v / mib:9.1f} MiB peak")
    print(f"recipes {', '.join(recipes)}: {res['seconds']} s")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
