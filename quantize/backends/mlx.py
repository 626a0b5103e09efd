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
from orlik.quantize.backends import Backend, Calibration, common
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


def predicate(recipe: Recipe, group: int) -> Any:
    """First matching glob over the MLX module path wins; unmatched layers take the recipe's bits."""
    rules = [(g, parse_override(t, group)) for g, t in recipe.overrides]

    def decide(path: str, module: Any) -> bool | dict[str, int]:
        if not hasattr(module, "to_quantized"):
            return False
        for glob, answer in rules:
            if fnmatch.fnmatchcase(path, glob):
                return answer
        return True

    return decide


class MLXBackend(Backend):
    name = "mlx-lm"
    formats = ("mlx",)

    @classmethod
    def missing(cls) -> str | None:
        return common.missing_modules(("mlx", "mlx_lm"), "mlx")

    def check(self, recipe: Recipe, calib: Calibration) -> None:
        bits, group = int(recipe.bits or 4), recipe.group_size or 64
        if bits not in BITS:
            raise InputError(f"MLX bits must be one of {', '.join(map(str, BITS))}, not {bits}")
        if group not in GROUPS:
            raise InputError(f"MLX group size must be one of {', '.join(map(str, GROUPS))}, not {group}")
        predicate(recipe, group)  # parses the overrides, so a bad type fails before any work

    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        import importlib.util

        from mlx_lm import convert
        from mlx_lm.utils import MODEL_REMAPPING

        self.check(recipe, calib)
        bits, group = int(recipe.bits or 4), recipe.group_size or 64
        arch = MODEL_REMAPPING.get(ckpt.arch, ckpt.arch)
        if importlib.util.find_spec(f"mlx_lm.models.{arch}") is None:
            raise InputError(f"mlx-lm has no model definition for architecture {ckpt.arch!r}")
        staging = out / ".convert"  # mlx-lm refuses an existing directory
        progress.info(f"{recipe.name}: mlx-lm convert ({bits}-bit, group {group})")
        try:
            convert(str(ckpt.path), str(staging), quantize=True, q_bits=bits, q_group_size=group,
                    dtype="float16", quant_predicate=predicate(recipe, group))  # fmt: skip
        except (ValueError, RuntimeError) as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise ToolError(f"mlx-lm convert failed on {ckpt.path}: {str(e).splitlines()[0]}") from None
        for f in sorted(staging.iterdir()):
            f.rename(out / f.name)
        staging.rmdir()
        return common.manifest(
            ckpt, recipe, calib, out, fmt="mlx", marker=".scales",
            tools={"mlx": common.version("mlx"), "mlx-lm": common.version("mlx-lm")},
            extra={"mode": "affine", "overrides": [list(o) for o in recipe.overrides]},
        )  # fmt: skip


BACKEND = MLXBackend
