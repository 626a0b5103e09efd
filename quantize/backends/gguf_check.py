"""The in-sample KLD check of an auto variant: `llama-perplexity --kl-divergence` of the written
GGUF against the F16 GGUF's logits on the first calibration tokens, recorded in variant.json beside
the estimate (a check of the estimate, not an evaluation)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orlik import llamacpp, progress
from orlik.errors import ToolError
from orlik.fsutil import atomic_write_text, cache_root, sha256_bytes
from orlik.quantize.backends import Calibration, common
from orlik.quantize.recipe import Recipe
from orlik.sysinfo import usable_cores

_KLD = re.compile(r"Mean\s+KLD:\s+(-?[0-9.]+)\s+±\s+([0-9.]+)")
_TOP = re.compile(r"Same top p:\s+([0-9.]+)\s+±")


@dataclass(frozen=True)
class KLDBase:
    """The F16 logits a written file's KLD is measured against, and llama-perplexity's arguments."""

    path: Path
    tokens: int
    args: tuple[str, ...]


def kld_base(f16: Path, calib: Calibration, recipe: Recipe, ckpt_hash: str, threads: int | None = None) -> KLDBase | None:  # fmt: skip
    """The F16 GGUF's logits on the first `measure_tokens` calibration tokens (llama-perplexity on
    `threads` threads, default all usable cores), computed once per checkpoint and calibration set
    and cached beside the sensitivity tables; None when measure_tokens is 0. It needs only the F16
    GGUF, so it can run while the types are planned."""
    n = int(recipe.options.get("measure_tokens", 1024))
    ctx = 512
    if n < ctx or calib.jsonl is None:
        return None
    work = cache_root() / "sensitivity" / f"kld-{sha256_bytes(f'{ckpt_hash}:{calib.hash}:{n}'.encode())[:24]}"
    work.mkdir(parents=True, exist_ok=True)
    text, base = work / "calibration.txt", work / "f16-logits.kld"
    common_args = ("-c", str(ctx), "-b", str(ctx), "--chunks", str(n // ctx))
    if not base.is_file():
        texts = common.calibration_texts(calib, recipe, None)
        atomic_write_text(text, "\n\n".join(texts))
        tmp = work / f".f16-logits.{time.time_ns()}.partial"
        try:
            rc, log = llamacpp.run_tool("llama-perplexity", ["-m", str(f16), "-f", str(text), *common_args, "-t",
                                                             str(threads or usable_cores()), "--kl-divergence-base", str(tmp)])  # fmt: skip
            if rc != 0 or not tmp.is_file():
                raise ToolError(f"llama-perplexity (F16 logits) failed: {log.strip().splitlines()[-1:]}")
            tmp.rename(base)
        finally:
            tmp.unlink(missing_ok=True)
    return KLDBase(base, n, common_args)


def measure_kld(quant: Path, base: KLDBase | None, threads: int | None = None) -> dict[str, Any] | None:
    """llama-perplexity --kl-divergence of `quant` against the F16 logits `base` (kld_base), on
    `threads` threads (default: all usable cores); None without them."""
    if base is None:
        return None
    n, common_args = base.tokens, [*base.args, "-t", str(threads or usable_cores())]
    for _ in range(5):  # llama.cpp's logger can drop its last lines on a busy machine; rerun then
        rc, log = llamacpp.run_tool("llama-perplexity", ["-m", str(quant), *common_args, "--kl-divergence-base",
                                                         str(base.path), "--kl-divergence"])  # fmt: skip
        k, top = _KLD.search(log), _TOP.search(log)
        if rc == 0 and k:
            return {"kld": float(k.group(1)), "kld_err": float(k.group(2)), "same_top_p": float(top.group(1)) / 100
                    if top else None, "tokens": n, "text": "calibration set (in-sample)"}  # fmt: skip
    # A check, not the product: the variant is kept, and the record says the measurement is missing.
    progress.info(f"auto: llama-perplexity printed no KLD for {quant.parent.name} in 5 tries; not measured")
    return {"kld": None, "tokens": n, "error": "llama-perplexity printed no final statistics"}
