"""Shared by the GPTQ/AWQ/HQQ/MLX backend tests: quantize into a directory through the driver
(run.quantize_all), and measure a variant against FP16 in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from orlik.manifest import Variant
from orlik.quantize import run
from orlik.quantize.backends import Calibration
from orlik.quantize.recipe import Recipe


def quantize(ckpt: Path, name: str, out: Path, calib_dir: Path | None = None, **options: Any) -> Variant:
    """Build one variant into `out` through the production driver, run.quantize_all (checks, prepare,
    staleness, atomic rename), with recipe options given as Python values; a failure raises its error."""
    recipe = Recipe.from_name(name)
    recipe = dataclasses.replace(recipe, options={**recipe.options, **options})
    root = out.with_name(out.name + ".root")  # quantize_all names the directory after the recipe
    calib = Calibration(jsonl=calib_dir / "calibration.jsonl") if calib_dir else Calibration()
    outcome = run.quantize_all(ckpt, [recipe], root, calib=calib)[0]
    if outcome.error is not None:
        raise outcome.error
    (root / recipe.name).rename(out)
    shutil.rmtree(root)
    return Variant.load(out)


# Runs in a fresh interpreter: only what is on disk reaches it.
_MEASURE = r"""
import json, sys
import numpy as np
from orlik.serving.runtimes.base import Sampling, load_runtime
from orlik import corpus

def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

ckpt, variants, chunks, n = sys.argv[1], sys.argv[2:], 3, 96
ref = load_runtime(ckpt)
toks = ref.tokenize(corpus.heldout_text("pl"))
pieces = [toks[i * n:(i + 1) * n] for i in range(chunks)]
refs = [log_softmax(ref.logits(p)) for p in pieces]
out = {}
for v in variants:
    rt = load_runtime(v)
    kl, same = [], []
    for p, r in zip(pieces, refs):
        logits = rt.logits(p)
        assert logits.dtype == np.float32 and logits.shape == (len(p), rt.n_vocab), (logits.dtype, logits.shape)
        q = log_softmax(logits)
        kl.append((np.exp(r) * (r - q)).sum(-1))
        same.append(r.argmax(-1) == q.argmax(-1))
    gen = list(rt.generate(rt.tokenize("Kraków to"), Sampling(max_tokens=8, temperature=0, ignore_eos=True)))
    out[v] = {"kld": float(np.concatenate(kl).mean()), "same_top": float(np.concatenate(same).mean()),
              "resident": int(rt.resident_weight_bytes()), "generated": len(gen), "runtime": rt.name}
print("RESULT " + json.dumps(out))
"""


def measure(ckpt: Path, *variants: Path, timeout: int = 600) -> dict[str, dict[str, Any]]:
    """Mean full-vocabulary KLD(FP16 || variant) over held-out Polish chunks, same-top rate,
    resident weight bytes and a greedy generation, each variant loaded from disk in a new process."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ckpt), *map(str, variants)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res: dict[str, dict[str, Any]] = json.loads(lines[-1][len("RESULT ") :])
    return {Path(k).name: v for k, v in res.items()}
