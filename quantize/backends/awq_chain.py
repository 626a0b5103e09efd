"""A correction to GPTQModel's AWQ scaling groups for models with module kinds left FP16.

When a module kind stays FP16 because the group size does not divide its width (orlik's `dynamic` skip rules), GPTQModel drops it from the
chain of scaling groups and pairs the next quantized module with the norm before it, so on a
320-wide llama with groups of 128 it scaled down_proj (768 inputs) against post_attention_layernorm
(320) and stopped the process. AWQ folds a group's scales into the op that produces its input;
that op may well stay FP16 (its weights are only rescaled), so the correction gives such a group
the linear before it in the model's module order, when that linear's output width matches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def _out_width(op: Any) -> int | None:
    """Rows of a linear's weight, or the length of a norm's: the width of what the op produces."""
    w = getattr(op, "weight", None)
    return int(w.shape[0]) if w is not None and getattr(w, "ndim", 0) >= 1 else None


def scaling_into_kept(nodes: list[dict[str, Any]], model: Any, module: Any) -> list[dict[str, Any]]:
    """GPTQModel's scaling groups for decoder layer `module` of `model` (a BaseQModel), each whose
    `prev_op` cannot take its scales (output width differs from the group's input width) given the
    linear just before it in the module order instead, if that one fits."""
    import torch
    from gptqmodel.quantization.awq.utils.module import get_op_name

    order = [name.split(":")[0] for block in model.full_layer_modules(model.model.config, is_awq_quantize=True)
             for name in block]  # fmt: skip
    for node in nodes:
        first = node["layers"][0]
        width = int(first.weight.shape[1])
        if _out_width(node["prev_op"]) == width:
            continue
        name = get_op_name(module, first)
        if name not in order or order.index(name) == 0:
            continue
        try:
            before = module.get_submodule(order[order.index(name) - 1])
        except AttributeError:
            continue
        if isinstance(before, torch.nn.Linear) and _out_width(before) == width:
            node["prev_op"] = before
    return nodes


def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` (BaseQModel.awq_get_modules_for_scaling) with the correction applied to its result."""

    @functools.wraps(original)
    def corrected(self: Any, module: Any, input_feat: Any, module_kwargs: Any) -> list[dict[str, Any]]:
        return scaling_into_kept(original(self, module, input_feat, module_kwargs), self, module)

    return corrected
