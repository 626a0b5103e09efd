"""HQQ backend: half-quadratic quantization (no calibration) of every linear layer in the decoder
blocks, 2/3/4/8-bit with group size 64 (or 32/128), saved as safetensors.

hqq's own saver pickles a `qmodel.pt`, and transformers 5 cannot load HQQ checkpoints, so the
layout here is the one transformers' HQQ integration and `hqq`'s `save_to_safetensors` use: each
quantized layer's HQQLinear state dict (packed `W_q`, `scale`, `zero` and its metadata encoded as
small tensors) under the layer's name, and `quantization_config` (`quant_method: hqq`) in
config.json. `HQQLinear.load_state_dict` reads it back (see serving/runtimes/hqq.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from orlik import progress
from orlik.checkpoint import TOKENIZER_FILES, Checkpoint
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.quantize.backends import Backend, Calibration, common
from orlik.quantize.recipe import Recipe

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
WEIGHTS = "model.safetensors"
_COPIED = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")  # fmt: skip
# Dense layers kept in FP16: the output head (as GPTQ/AWQ keep it), matching transformers' default.
SKIP = ("lm_head",)


def quant_config(bits: int, group: int, axis: int) -> dict[str, Any]:
    """The `quantization_config` transformers' HqqConfig writes, so its parser reads ours."""
    from transformers import HqqConfig

    cfg = HqqConfig(nbits=bits, group_size=group, axis=axis, skip_modules=list(SKIP))
    d: dict[str, Any] = cfg.to_dict()
    return d


class HQQBackend(Backend):
    name = "hqq"
    formats = ("hqq",)

    @classmethod
    def missing(cls) -> str | None:
        return common.missing_modules(("hqq", "transformers", "torch"), "hqq")

    def check(self, recipe: Recipe, calib: Calibration) -> None:
        bits, group = int(recipe.bits or 4), recipe.group_size or 64
        if bits not in BITS:
            raise InputError(f"HQQ bits must be one of {', '.join(map(str, BITS))}, not {bits}")
        if group not in GROUPS:
            raise InputError(f"HQQ group size must be one of {', '.join(map(str, GROUPS))}, not {group}")
        if int(recipe.options.get("axis", 1)) not in (0, 1):
            raise InputError("HQQ axis must be 0 or 1")

    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        import torch
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
        from safetensors.torch import save_file

        self.check(recipe, calib)
        bits, group = int(recipe.bits or 4), recipe.group_size or 64
        axis = int(recipe.options.get("axis", 1))
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        common.check_arch(ckpt, CONFIG_MAPPING_NAMES, "HQQ (through transformers' model classes)")
        common.seed_everything(int(recipe.options.get("seed", 0)))
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        qcfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=axis)
        # HQQ's optimiser runs in float32 whatever the storage type; scales/zeros are kept in FP16.
        model = ckpt.load_model(dtype=torch.float16)
        targets = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] not in SKIP
        ]
        if not targets:
            raise InputError(f"architecture {ckpt.arch!r} has no linear layers HQQ can quantize")
        with progress.bar(f"{recipe.name}: HQQ", total=len(targets)) as bar:
            for name, lin in targets:
                if lin.in_features % group:
                    raise InputError(
                        f"{name}: {lin.in_features} inputs are not a multiple of group size {group}"
                    )
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                # Quantized one layer at a time and the FP16 weight dropped, so memory only falls.
                q = HQQLinear(lin, qcfg, compute_dtype=torch.float16, device="cpu", del_orig=True)
                setattr(parent, name.rsplit(".", 1)[1], q)
                bar.advance()
        tensors: dict[str, torch.Tensor] = {}
        quantized = {name for name, _ in targets}
        for name, mod in model.named_modules():
            if name in quantized:
                for k, v in mod.state_dict().items():
                    tensors[f"{name}.{k}"] = v.detach().contiguous()
        for k, v in model.state_dict().items():
            if k.rsplit(".", 1)[0] not in quantized:
                tensors[k] = v.detach().contiguous()
        # Tied embeddings share storage; safetensors refuses aliases, and the loader re-ties them.
        if getattr(model.config, "tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "quantizer": "hqq"})
        del model, tensors
        config = json.loads((ckpt.path / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = quant_config(bits, group, axis)
        (out / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        for name in _COPIED:
            if (ckpt.path / name).is_file():
                shutil.copyfile(ckpt.path / name, out / name)
        return common.manifest(
            ckpt, recipe, calib, out, fmt="hqq", marker=".W_q",
            tools={"hqq": common.version("hqq"), "transformers": common.version("transformers"),
                   "torch": common.version("torch")},
            extra={"axis": axis, "packing": _packing(bits), "quantized_layers": len(targets),
                   "kept_fp16": list(SKIP)},
        )  # fmt: skip


def _packing(bits: int) -> str:
    from hqq.core.quantize import Quantizer

    return str(Quantizer.bit_to_packing[bits])


BACKEND = HQQBackend
