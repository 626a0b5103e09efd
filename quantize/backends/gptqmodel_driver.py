"""GPTQModel, driven on CPU for the GPTQ and AWQ backends: load lazily, calibrate, pack, save,
and leave a directory whose bytes depend only on the inputs.

GPTQModel (the maintained successor of AutoGPTQ and AutoAWQ) writes the standard formats
(`quant_method: gptq` with qweight/qzeros/scales/g_idx; `quant_method: awq`, GEMM packing) that
transformers, GPTQModel itself and vLLM load.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ToolError
from orlik.quantize.backends import Calibration, groups
from orlik.quantize.backends.common import (
    CALIBRATION_OPTIONS,
    calibration_batches,
    calibration_texts,
    check_arch,
    lean_malloc,
    seed_everything,
)
from orlik.quantize.liblog import library_log
from orlik.quantize.recipe import Recipe
from orlik.sysinfo import usable_cores

MODULES = ("gptqmodel", "optimum")
# Written by GPTQModel but not part of the format: run timings, and a scratch path in the config.
_LOG = "quant_log.csv"
_VOLATILE_META = ("offload_to_disk_path",)
_CONFIGS = ("config.json", "quantize_config.json")
SCRATCH = ".offload"
OPTIONS: dict[str, type] = {**CALIBRATION_OPTIONS, "offload": bool, "lean_malloc": bool}


# Import-time warnings of GPTQModel's dependencies that say nothing about the user's run: torchao
# failing to load its CUDA-only kernels (.so files for sm90/mxfp8) on a CPU machine, and torch
# deprecating how torchao registers two enums. Errors from these loggers still show.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def prepare_env() -> None:
    """GPTQModel defaults to half the cores for CPU work; on small machines that is one worker."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(usable_cores()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def offload(recipe: Recipe, out: Path) -> dict[str, Any]:
    """Config keywords for layer-by-layer work: GPTQModel reads each layer from the safetensors file
    when it reaches it and writes finished layers to a scratch dir inside the staging directory,
    so the whole FP16 model is never resident (recipe option `offload: false` turns it off)."""
    on = bool(recipe.options.get("offload", True))
    return {"offload_to_disk": on, "offload_to_disk_path": str(out / SCRATCH) if on else None}


def supported_archs() -> list[str]:
    prepare_env()
    from gptqmodel.models.auto import MODEL_MAP

    return list(MODEL_MAP)


def run(
    ckpt: Checkpoint,
    recipe: Recipe,
    calib: Calibration,
    out: Path,
    qcfg: Any,
    backend: Any,
    *,
    pack: bool = False,
    samples: int = 128,
) -> dict[str, Any]:
    """Quantize `ckpt` with the GPTQModel config `qcfg` into `out`; returns facts for the manifest.
    What GPTQModel and tokenicer print goes to `<variants>/<name>.log`, named on the terminal."""
    log = out.parent / f"{recipe.name}.log"
    progress.info(f"{recipe.name}: GPTQModel's own output goes to {log}")
    with library_log(log), _hard_stop_said(recipe.name, log):
        return _run(ckpt, recipe, calib, out, qcfg, backend, pack=pack, samples=samples)


@contextlib.contextmanager
def _hard_stop_said(name: str, log: Path) -> Iterator[None]:
    """GPTQModel ends the whole process (traceback on stderr, os._exit(1)) when a task fails in one
    of its worker threads, so no exception reaches orlik. Within the block such a stop still ends
    the process with exit 1, but the traceback goes to the log and the terminal gets one line,
    naming the error and the log."""
    from gptqmodel.utils import threadx

    worker = threadx._DeviceWorker
    original = worker.__dict__["_abort_process"]

    def abort(self: Any, exc: BaseException) -> None:
        with contextlib.suppress(Exception), open(log, "a", encoding="utf-8") as f:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        with contextlib.suppress(Exception):
            os.write(
                2, f"orlik: error: {name}: GPTQModel stopped the process: {first} (details: {log})\n".encode()
            )
        os._exit(1)

    worker._abort_process = abort
    try:
        yield
    finally:
        worker._abort_process = original


def _run(ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path, qcfg: Any, backend: Any, *, pack: bool,
         samples: int) -> dict[str, Any]:  # fmt: skip
    prepare_env()
    import torch
    from gptqmodel import GPTQModel

    check_arch(ckpt, supported_archs(), "GPTQModel")
    if recipe.options.get("lean_malloc", True):
        lean_malloc()
    seed_everything(int(recipe.options.get("seed", 0)))
    tokenizer = ckpt.load_tokenizer()
    batches = calibration_batches(
        calibration_texts(calib, recipe, tokenizer), tokenizer, recipe, pack=pack, samples=samples
    )
    scratch = Path(qcfg.offload_to_disk_path or out / SCRATCH)
    progress.info(f"{recipe.name}: GPTQModel on {len(batches)} calibration samples ({qcfg.method}, CPU)")
    from gptqmodel.looper import loop_processor

    # GPTQModel writes a per-run log under ./logs of whatever directory the user is in; keep it
    # in the staging dir's scratch instead (removed below).
    log_dir, loop_processor._PROJECT_LOG_DIR = loop_processor._PROJECT_LOG_DIR, scratch / "logs"
    try:
        model = GPTQModel.load(str(ckpt.path), qcfg, device="cpu", dtype=torch.float16)
        model.quantize(batches, batch_size=1, tokenizer=tokenizer, backend=backend)
        model.save(str(out))
    except (ValueError, RuntimeError, NotImplementedError) as e:
        raise ToolError(f"GPTQModel failed on {ckpt.path}: {str(e).splitlines()[0]}") from None
    finally:
        loop_processor._PROJECT_LOG_DIR = log_dir
        shutil.rmtree(scratch, ignore_errors=True)
    del model
    losses = _read_losses(out / _LOG)
    _normalize(out, ckpt)
    return {"calibration_samples": len(batches), "calibration_tokens": sum(len(b["input_ids"]) for b in batches),
            **losses}  # fmt: skip


def _read_losses(log: Path) -> dict[str, Any]:
    """GPTQModel's per-layer reconstruction losses; the log itself holds timings, so it is not kept."""
    if not log.is_file():
        return {}
    with open(log, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    log.unlink()
    scored = [(_float(r.get("loss")), r) for r in rows]
    scored = [(x, r) for x, r in scored if x is not None]  # AWQ writes "not applicable" for some rows
    if not scored:
        return {}
    worst, row = max(scored, key=lambda p: p[0])
    return {"layer_loss_mean": sum(x for x, _ in scored) / len(scored), "layer_loss_max": worst,
            "layer_loss_worst": f"{row.get('layer')}.{row.get('module')}"}  # fmt: skip


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _normalize(out: Path, ckpt: Checkpoint) -> None:
    """Drop run-dependent values, and keep the checkpoint's own generation config and template."""

    def drop_volatile(q: dict[str, Any]) -> None:
        for key in _VOLATILE_META:
            (q.get("meta") or {}).pop(key, None)

    _edit_quant_configs(out, drop_volatile)
    # GPTQModel rewrites sampling defaults into generation_config.json; the user's are the truth.
    for name in ("generation_config.json", "chat_template.jinja"):
        if (ckpt.path / name).is_file():
            shutil.copyfile(ckpt.path / name, out / name)
    if not (out / "config.json").is_file():
        raise InputError(f"GPTQModel wrote no config.json into {out}")


# --- widths a group size does not divide ----------------------------------------------------------


def block_kind(module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj': the module's name within its block."""
    parts = module.split(".")
    last = max(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[last + 1 :])


def keep_plan(ckpt: Checkpoint, recipe: Recipe, group: int, fmt: str) -> groups.GroupPlan:
    """GPTQ and AWQ checkpoints hold one group size, and their transformers loaders name the modules
    left FP16 by their name within a block (GPTQ: modules_in_block_to_quantize, AWQ:
    modules_to_not_convert), so a module kind with a width `group` does not divide stays FP16 in
    every block. A model with no module kind left to quantize is refused."""
    widths = groups.widths(ckpt)
    found = groups.plan(recipe.name, widths, group, (group,), per_module=False, keep=True, fmt=fmt)
    kinds = {block_kind(n) for n in found.kept}
    kept = {n: w for n, w in widths.items() if block_kind(n) in kinds}
    if widths and len(kept) == len(widths):
        name, width = next(iter(found.kept.items()))
        raise InputError(f"{recipe.name}: group size {group} divides no module's width ({name} has {width} "
                         f"input features); choose a group size that divides the model's widths")  # fmt: skip
    return groups.GroupPlan(group, {}, kept)


def skip_rules(plan: groups.GroupPlan) -> dict[str, dict[str, Any]]:
    """GPTQModel's own way to leave modules unquantized: a negative `dynamic` rule per module kind."""
    return {f"-:.*\\.{re.escape(k)}$": {} for k in sorted({block_kind(n) for n in plan.kept})}


def write_loader_keys(out: Path, plan: groups.GroupPlan, fmt: str, ckpt: Checkpoint) -> None:
    """Name the plan's FP16 modules in the written quantization_config the way transformers' loader
    reads them, so it builds plain linears for them (GPTQModel's `dynamic` rules it does not read)."""
    kept = sorted({block_kind(n) for n in plan.kept})
    if not kept:
        return
    quantized = sorted({block_kind(n) for n in groups.widths(ckpt)} - set(kept))

    def name_kept(q: dict[str, Any]) -> None:
        if fmt == "awq":
            q["modules_to_not_convert"] = sorted({*(q.get("modules_to_not_convert") or []), *kept})
        else:
            q["modules_in_block_to_quantize"] = [quantized]

    _edit_quant_configs(out, name_kept)


def _edit_quant_configs(out: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply `edit` to the quantization config in each of GPTQModel's written config files."""
    for name in _CONFIGS:
        p = out / name
        if not p.is_file():
            continue
        cfg = json.loads(p.read_text(encoding="utf-8"))
        edit(cfg.get("quantization_config", cfg))
        p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
