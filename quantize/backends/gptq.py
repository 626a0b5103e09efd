"""GPTQ backend: GPTQModel on CPU, 2/3/4/8-bit, group size 32/64/128 or per-channel, act-order,
damping; writes the standard GPTQ checkpoint (`quant_method: gptq`) that transformers and vLLM load.
"""

from __future__ import annotations

from pathlib import Path

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.quantize.backends import Backend, Calibration, common, gptqmodel_driver, groups
from orlik.quantize.recipe import Recipe

BITS = (2, 3, 4, 8)


class GPTQBackend(Backend):
    name = "gptqmodel"
    formats = ("gptq",)
    options = {
        **gptqmodel_driver.OPTIONS,
        "act_order": bool,
        "damp": float,
        "sym": bool,
        "true_sequential": bool,
    }

    @classmethod
    def missing(cls) -> str | None:
        return common.missing_modules(gptqmodel_driver.MODULES, "gptq")

    def check(self, recipe: Recipe, calib: Calibration) -> None:
        bits, group = int(recipe.bits or 4), recipe.group_size
        if bits not in BITS:
            raise InputError(f"GPTQ bits must be one of {', '.join(map(str, BITS))}, not {bits}")
        if group is not None and (group <= 0 or group % 32):
            raise InputError(f"GPTQ group size must be a positive multiple of 32 or per-channel, not {group}")
        if not 0 < float(recipe.options.get("damp", 0.01)) < 1:
            raise InputError("GPTQ damp (fraction of the mean Hessian diagonal) must be in (0, 1)")
        common.require_calibration(recipe, calib)

    def prepare(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration) -> None:
        group = recipe.group_size
        if group:
            gptqmodel_driver.keep_plan(ckpt, recipe, group, "gptq")

    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        self.check(recipe, calib)
        gptqmodel_driver.prepare_env()
        from gptqmodel import BACKEND as KERNEL
        from gptqmodel.quantization.config import GPTQConfig

        bits, group = int(recipe.bits or 4), recipe.group_size
        opts = recipe.options
        # Module kinds whose width the group size does not divide stay FP16 (a per-module group size
        # is GPTQModel's `dynamic`, which transformers' loader does not read).
        plan = gptqmodel_driver.keep_plan(ckpt, recipe, group, "gptq") if group else groups.GroupPlan(-1)
        qcfg = GPTQConfig(
            dynamic=gptqmodel_driver.skip_rules(plan) or None,
            bits=bits,
            group_size=group or -1,
            desc_act=bool(opts.get("act_order", False)),
            damp_percent=float(opts.get("damp", 0.01)),
            sym=bool(opts.get("sym", True)),
            true_sequential=bool(opts.get("true_sequential", True)),
            **gptqmodel_driver.offload(recipe, out),
        )
        facts = gptqmodel_driver.run(ckpt, recipe, calib, out, qcfg, KERNEL.GPTQ_TORCH)
        gptqmodel_driver.write_loader_keys(out, plan, "gptq", ckpt)
        return common.manifest(
            ckpt, recipe, calib, out, fmt="gptq", marker=".qweight",
            tools={"gptqmodel": common.version("gptqmodel"), "transformers": common.version("transformers"),
                   "torch": common.version("torch")},
            extra={"act_order": qcfg.desc_act, "damp_percent": qcfg.damp_percent, "sym": qcfg.sym, **facts,
                   **plan.record()},
        )  # fmt: skip


BACKEND = GPTQBackend
