"""MLX backend: mlx-lm's own conversion API, 2/3/4/6/8-bit affine with group size 32/64/128, and
mixed recipes through a quantization predicate (e.g. a 4-bit body with 6-bit embeddings and head).

The output is a standard mlx-lm directory (config.json with `quantization`, model.safetensors,
tokenizer) that `mlx_lm.generate` and `mlx_lm.server` load on a Mac; on Linux mlx-cpu runs it.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
from pathlib import Path
from typing import Any

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ToolError
from orlik.manifest import Variant
from orlik.quantize.backends import Backend, Calibration, common, groups
from orlik.quantize.recipe import Recipe

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
_TYPE = re.compile(r"q?(\d)(?:-?g(\d+))?", re.IGNORECASE)
_KEEP = ("f16", "fp16", "bf16", "none")


def parse_override(value: str, default_group: int) -> dict[str, int] | bool:
    """An override type -> mlx-lm predicate answer: "6", "q6", "6g32" -> params; "f16" -> False."""
    v = value.strip().lower()
    if v in _KEEP:
        return False
    m = _TYPE.fullmatch(v)
    if not m:
        raise InputError(f"MLX override type {value!r} is not <bits>[g<group>] or f16")
    bits, group = int(m.group(1)), int(m.group(2) or default_group)
    if bits not in BITS or group not in GROUPS:
        raise InputError(f"MLX override {value!r}: bits must be in {BITS} and group size in {GROUPS}")
    return {"bits": bits, "group_size": group}


def predicate(
    recipe: Recipe, group: int, plan: groups.GroupPlan | None = None, base: int | None = None
) -> Any:
    """First matching glob over the MLX module path wins; unmatched layers take the recipe's bits, at
    the group size `plan` gives them (FP16 where it gives none). `base` is the group size mlx-lm is
    called with: it leaves unquantized, without asking, any layer whose width that does not divide."""
    rules = [(g, parse_override(t, group)) for g, t in recipe.overrides]

    def decide(path: str, module: Any) -> bool | dict[str, int]:
        if not hasattr(module, "to_quantized"):
            return False
        for glob, answer in rules:
            if fnmatch.fnmatchcase(path, glob):
                return answer
        g = plan.group_of(path) if plan is not None else group
        if g is None:
            return False
        return True if g == (base or group) else {"bits": int(recipe.bits or 4), "group_size": g}

    return decide


def group_plan(ckpt: Checkpoint, recipe: Recipe) -> groups.GroupPlan:
    """mlx-lm records a group size per layer in config.json, embeddings and head included, and leaves
    a layer no group size divides in FP16; its AWQ takes one group size for the whole model."""
    awq = recipe.options.get("method") == "awq"
    return groups.plan(recipe.name, groups.widths(ckpt, dense=True), recipe.group_size or 64, GROUPS,
                       per_module=not awq, keep=not awq, fmt="mlx (AWQ)" if awq else "mlx")  # fmt: skip


def awq_convert(
    ckpt: Checkpoint, recipe: Recipe, calib: Calibration, dst: Path, bits: int, group: int
) -> None:
    """mlx-lm's AWQ (activation-aware scales and clipping searched layer by layer) on orlik's
    calibration set; mlx-lm's own command would download its calibration text instead."""
    import mlx.core as mx
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config
    from mlx_lm.utils import load, save

    awq_cfg = AWQ_MODEL_CONFIGS.get(ckpt.arch)
    if awq_cfg is None:
        raise InputError(f"mlx-lm's AWQ has no layer map for architecture {ckpt.arch!r}")
    mx.random.seed(int(recipe.options.get("seed", 0)))
    model, tokenizer, config = load(str(ckpt.path), lazy=True, return_config=True)
    # The scale search runs many forwards; mlx-cpu is ~30x slower in float16 than float32.
    # Scales, biases and dense tensors are stored in float16 afterwards, as `convert` does.
    model.set_dtype(mx.float32)
    seq = int(recipe.options.get("calib_seq_len", 512))
    texts = common.calibration_texts(calib, recipe, tokenizer._tokenizer)
    ids = [t for text in texts for t in tokenizer.encode(text)]
    n = min(len(ids) // seq, int(recipe.options.get("calib_samples", 128)))
    if n < 1:
        raise InputError(f"the calibration set has fewer than {seq} tokens")
    # Contiguous fixed-length windows in file order, as mlx-lm cuts its own calibration text.
    inputs = mx.array(ids[: n * seq]).reshape(n, seq)
    awq_quantize(model, inputs, awq_cfg, bits=bits, group_size=group,
                 embed_bits=int(recipe.options.get("embed_bits", 6)), embed_group_size=group)  # fmt: skip
    model.set_dtype(mx.float16)
    save(str(dst), str(ckpt.path), model, tokenizer, update_config(model, config))


class MLXBackend(Backend):
    name = "mlx-lm"
    formats = ("mlx",)
    # sens_*: the sensitivity pass of mlx-auto (mlx_auto.py).
    options = {"calib_samples": int, "calib_seq_len": int, "embed_bits": int, "method": str, "seed": int,
               "sens_tokens": int, "sens_seq_len": int, "sens_rows": float, "sens_max_rows": int, "probe_tokens": int,
               "probe_seq_len": int, "sens_dtype": str}  # fmt: skip

    @classmethod
    def missing(cls) -> str | None:
        return common.missing_modules(("mlx", "mlx_lm"), "mlx")

    def stale(self, variant: Variant, recipe: Recipe) -> str | None:
        if not recipe.options.get("auto"):
            return None
        from orlik.quantize.backends import mlx_auto

        return common.auto_method_changed(variant, mlx_auto.METHOD)

    def check(self, recipe: Recipe, calib: Calibration) -> None:
        if recipe.options.get("auto"):  # mlx-auto: bits and group per layer, chosen in mlx_auto.py
            if not any(recipe.options.get(k) is not None for k in ("target_size", "target_bpw")):
                raise InputError(
                    f"recipe {recipe.name} needs a target: --target-bpw BPW or --target-size SIZE"
                )
            common.require_calibration(recipe, calib)
            from orlik.quantize import sensitivity

            sensitivity.base_settings(recipe.options)  # refuses probe_tokens that are not whole windows
            return
        bits, group = int(recipe.bits or 4), recipe.group_size or 64
        if bits not in BITS:
            raise InputError(f"MLX bits must be one of {', '.join(map(str, BITS))}, not {bits}")
        if group not in GROUPS:
            raise InputError(f"MLX group size must be one of {', '.join(map(str, GROUPS))}, not {group}")
        predicate(recipe, group)  # parses the overrides, so a bad type fails before any work
        method = recipe.options.get("method", "rtn")
        if method not in ("rtn", "awq"):
            raise InputError(f"MLX method must be rtn (round to nearest) or awq, not {method!r}")
        if method == "awq":
            if recipe.overrides:
                raise InputError(
                    "MLX AWQ sets the embedding/head bits itself (embed_bits); drop the overrides"
                )
            common.require_calibration(recipe, calib)

    def prepare(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration) -> None:
        if not recipe.options.get("auto"):
            group_plan(ckpt, recipe)

    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        if recipe.options.get("auto"):
            from orlik.quantize.backends import mlx_auto

            return mlx_auto.quantize(self, ckpt, recipe, calib, out)
        import importlib.util

        from mlx_lm import convert
        from mlx_lm.utils import MODEL_REMAPPING

        self.check(recipe, calib)
        bits, group = int(recipe.bits or 4), recipe.group_size or 64
        arch = MODEL_REMAPPING.get(ckpt.arch, ckpt.arch)
        if importlib.util.find_spec(f"mlx_lm.models.{arch}") is None:
            raise InputError(f"mlx-lm has no model definition for architecture {ckpt.arch!r}")
        gplan = group_plan(ckpt, recipe)
        base = min([group, *gplan.by_module.values()])
        staging = out / ".convert"  # mlx-lm refuses an existing directory
        method = str(recipe.options.get("method", "rtn"))
        progress.info(f"{recipe.name}: mlx-lm {method} ({bits}-bit, group {group})")
        try:
            if method == "awq":
                awq_convert(ckpt, recipe, calib, staging, bits, group)
            else:
                convert(str(ckpt.path), str(staging), quantize=True, q_bits=bits, q_group_size=base,
                        dtype="float16", quant_predicate=predicate(recipe, group, gplan, base))  # fmt: skip
        except (ValueError, RuntimeError, NotImplementedError) as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise ToolError(f"mlx-lm convert failed on {ckpt.path}: {str(e).splitlines()[0]}") from None
        for f in sorted(staging.iterdir()):
            f.rename(out / f.name)
        staging.rmdir()
        return common.manifest(
            ckpt, recipe, calib, out, fmt="mlx", marker=".scales",
            tools={"mlx": common.version("mlx"), "mlx-lm": common.version("mlx-lm")},
            extra={"mode": "affine", "method": method, "overrides": [list(o) for o in recipe.overrides],
                   **gplan.record()},
        )  # fmt: skip


BACKEND = MLXBackend
