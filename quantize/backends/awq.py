"""AWQ backend: GPTQModel's activation-aware scale search on the calibration set, 4-bit with group
size 128 or 64, written in the standard AWQ GEMM format (`quant_method: awq`, `version: gemm`).

GPTQModel picks its CUDA GEMM kernel to pack AWQ weights; its portable torch kernel writes the
same GEMM layout, so on CPU the backend asks for that one explicitly.
"""

from __future__ import annotations

from pathlib import Path

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.quantize.backends import Backend, Calibration, awq_lean, common, gptqmodel_driver
from orlik.quantize.recipe import Recipe

BITS = (4,)  # the GEMM layout packs eight 4-bit values per int32
GROUPS = (32, 64, 128)


class AWQBackend(Backend):
    name = "gptqmodel-awq"
    formats = ("awq",)
    options = {**gptqmodel_driver.OPTIONS, "sym": bool, **dict.fromkeys(awq_lean.CHANGES, bool)}

    @classmethod
    def missing(cls) -> str | None:
        return common.missing_modules(gptqmodel_driver.MODULES, "awq")

    def check(self, recipe: Recipe, calib: Calibration) -> None:
        bits, group = int(recipe.bits or 4), recipe.group_size or 128
        if bits not in BITS:
            raise InputError(f"AWQ (GEMM format) is 4-bit only, not {bits}-bit")
        if group not in GROUPS:
            raise InputError(f"AWQ group size must be one of {', '.join(map(str, GROUPS))}, not {group}")
        common.require_calibration(recipe, calib)

    def prepare(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration) -> None:
        group = recipe.group_size or 128
        if group:
            gptqmodel_driver.keep_plan(ckpt, recipe, group, "awq")

    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        self.check(recipe, calib)
        gptqmodel_driver.prepare_env()
        from gptqmodel import BACKEND as KERNEL
        from gptqmodel.quantization.config import AWQConfig

        bits, group = int(recipe.bits or 4), recipe.group_size or 128
        # Asymmetric with a zero point is what the AWQ format and its kernels expect.
        # Module kinds whose width the group size does not divide stay FP16 (modules_to_not_convert).
        plan = gptqmodel_driver.keep_plan(ckpt, recipe, group, "awq")
        qcfg = AWQConfig(
            dynamic=gptqmodel_driver.skip_rules(plan) or None,
            bits=bits,
            group_size=group,
            sym=bool(recipe.options.get("sym", False)),
            **gptqmodel_driver.offload(recipe, out),
        )
        # Equal-length packed blocks: GPTQModel stacks the activations of all of them for the scale
        # search; with variable-length samples it keeps only the last batch, falls below its 0.5%
        # coverage threshold, and silently quantizes every layer round-to-nearest instead.
        # 32 blocks of 512 tokens by default (recipe option calib_samples): the scale search runs a
        # forward pass per grid point over every block.
        # awq_lean replaces five parts of GPTQModel's AWQ processor to bound its memory; each recipe
        # option named in awq_lean.CHANGES set to false keeps GPTQModel's own.
        lean = awq_lean.installed(**{k: bool(recipe.options.get(k, True)) for k in awq_lean.CHANGES})
        with lean:
            facts = gptqmodel_driver.run(
                ckpt, recipe, calib, out, qcfg, KERNEL.AWQ_TORCH, pack=True, samples=32
            )
        gptqmodel_driver.write_loader_keys(out, plan, "awq", ckpt)
        return common.manifest(
            ckpt, recipe, calib, out, fmt="awq", marker=".qweight",
            tools={"gptqmodel": common.version("gptqmodel"), "transformers": common.version("transformers"),
                   "torch": common.version("torch")},
            extra={"zero_point": not qcfg.sym, "awq_version": "gemm", **facts, **plan.record()},
        )  # fmt: skip


BACKEND = AWQBackend
