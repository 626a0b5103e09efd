"""Group sizes against a checkpoint's widths, checked before any work starts.

A grouped format (GPTQ, AWQ, HQQ, MLX) cuts each weight row into groups of `group_size` input
features, and its runtimes' kernels need the group size to divide the row (torch's CPU int4 kernel,
AWQ's GEMM packing, mlx's quantize). A checkpoint with a width that the recipe's group size does not
divide (hidden size 320 or 960 with groups of 128) gets what its format allows: a smaller group size
that divides, for that module only, where the format stores one per module; else the module stays
FP16, where the format can leave modules unquantized (the whole-model bpw then counts its 16 bits);
else one line naming the module and its width.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.quantize.backends.common import safetensors_header


@dataclass(frozen=True)
class GroupPlan:
    """What each quantized module gets; modules named nowhere take `group`."""

    group: int
    by_module: dict[str, int] = field(default_factory=dict)  # module -> the dividing group it gets
    kept: dict[str, int] = field(default_factory=dict)  # module left FP16 -> its width

    def group_of(self, module: str) -> int | None:
        """The group size `module` is quantized with, or None when it stays FP16."""
        if module in self.kept:
            return None
        return self.by_module.get(module, self.group)

    def record(self) -> dict[str, Any]:
        """For variant.json: the exceptions to the recipe's group size, by module."""
        return {
            "group_size_by_module": dict(sorted(self.by_module.items())),
            "kept_fp16_for_width": dict(sorted(self.kept.items())),
        }


def widths(ckpt: Checkpoint, *, dense: bool = False) -> dict[str, int]:
    """Module name -> input features of each 2-D weight in the decoder blocks (those whose name has a
    layer number); with `dense`, the embeddings and the output head too (MLX quantizes them)."""
    out: dict[str, int] = {}
    for f in ckpt.weight_files:
        for name, meta in safetensors_header(f).items():
            shape = meta.get("shape") or []
            if not name.endswith(".weight") or len(shape) != 2:
                continue
            module = name[: -len(".weight")]
            if dense or any(part.isdigit() for part in module.split(".")):
                out[module] = int(shape[1])
    return out


def plan(
    recipe_name: str,
    modules: dict[str, int],
    group: int,
    choices: Iterable[int],
    *,
    per_module: bool,
    keep: bool,
    fmt: str,
) -> GroupPlan:
    """The GroupPlan for `modules` (name -> width) at `group`, or an InputError naming the first
    module the format can do nothing for. `choices` are the group sizes the format's runtimes run."""
    smaller = sorted((g for g in choices if g < group), reverse=True)
    by_module: dict[str, int] = {}
    kept: dict[str, int] = {}
    for name, width in modules.items():
        if width % group == 0:
            continue
        fit = next((g for g in smaller if width % g == 0), None) if per_module else None
        if fit is not None:
            by_module[name] = fit
        elif keep:
            kept[name] = width
        else:
            raise InputError(_refusal(recipe_name, name, width, group, modules, choices, fmt))
    return GroupPlan(group, by_module, kept)


def _refusal(
    recipe_name: str,
    name: str,
    width: int,
    group: int,
    modules: dict[str, int],
    choices: Iterable[int],
    fmt: str,
) -> str:
    fits = [g for g in sorted(choices, reverse=True) if all(w % g == 0 for w in modules.values())]
    hint = f"; group size {fits[0]} divides every width" if fits else ""
    return (
        f"{recipe_name}: {name} has {width} input features, which group size {group} does not divide, "
        f"and the {fmt} format can neither take another group size for it nor leave it unquantized{hint}"
    )
