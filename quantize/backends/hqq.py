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
from orlik.checkpoint import TOKENIZER_FILES, Checkpoint, tensor_spans
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.quantize.backends import Backend, Calibration, common, groups
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
    options = {"axis": int, "seed": int}

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

    def prepare(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration) -> None:
        self.group_plan(ckpt, recipe)

    @staticmethod
    def group_plan(ckpt: Checkpoint, recipe: Recipe) -> groups.GroupPlan:
        """HQQ stores each layer's group size with the layer, so a width the recipe's group size does
        not divide takes the largest smaller one that does, or stays FP16 if none does."""
        group = recipe.group_size or 64
        return groups.plan(recipe.name, groups.widths(ckpt), group, GROUPS, per_module=True, keep=True,
                           fmt="hqq")  # fmt: skip

    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        import torch
        from hqq.core.quantize import HQQBackend as HqqKernels  # not this module's HQQBackend
        from hqq.core.quantize import HQQLinear
        from safetensors.torch import save_file

        self.check(recipe, calib)
        bits, group = int(recipe.bits or 4), recipe.group_size or 64
        axis = int(recipe.options.get("axis", 1))
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        common.check_arch(ckpt, CONFIG_MAPPING_NAMES, "HQQ (through transformers' model classes)")
        common.seed_everything(int(recipe.options.get("seed", 0)))
        HQQLinear.set_backend(HqqKernels.PYTORCH)
        gplan = self.group_plan(ckpt, recipe)
        # Layer by layer from the safetensors files: the model is built on the meta device only to
        # name its linear layers, and each weight is read, quantized and dropped in turn, so peak
        # memory is the quantized output plus one FP16 layer, not the whole FP16 model.
        # HQQ's optimiser runs in float32 whatever the storage type; scales/zeros are kept in FP16.
        targets, tied = _linear_layers(ckpt)
        if not targets:
            raise InputError(f"architecture {ckpt.arch!r} has no linear layers HQQ can quantize")
        with _Tensors(ckpt) as weights:
            tensors: dict[str, torch.Tensor] = {}
            with progress.bar(f"{recipe.name}: HQQ", total=len(targets)) as bar:
                for name in targets:
                    g = gplan.group_of(name)
                    if g is None:  # left FP16 with the dense tensors below
                        bar.advance()
                        continue
                    w = weights.take(f"{name}.weight")
                    bias = weights.take(f"{name}.bias") if f"{name}.bias" in weights else None
                    for k, v in _hqq_linear(w, bias, bits, g, axis).items():
                        tensors[f"{name}.{k}"] = v
                    del w, bias
                    common.release_memory()
                    bar.advance()
            for k in weights.left():  # embeddings, norms, the output head: FP16, as the loader expects
                t = weights.take(k)
                tensors[k] = (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
        # Tied embeddings share storage; safetensors refuses aliases, and the loader re-ties them.
        if tied:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "quantizer": "hqq"})
        del tensors
        _write_config(ckpt, out, bits, group, axis)
        return common.manifest(
            ckpt, recipe, calib, out, fmt="hqq", marker=".W_q",
            tools={"hqq": common.version("hqq"), "transformers": common.version("transformers"),
                   "torch": common.version("torch")},
            extra={"axis": axis, "packing": _packing(bits), "quantized_layers": len(targets) - len(gplan.kept),
                   "kept_fp16": list(SKIP), **gplan.record()},
        )  # fmt: skip


def _hqq_linear(w: Any, bias: Any, bits: int, group: int, axis: int) -> dict[str, Any]:
    """One linear layer through HQQ: its quantized state (W_q, scales, zeros, meta, bias)."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    qcfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=axis)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(w.to(torch.float16), requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.to(torch.float16), requires_grad=False)
    q = HQQLinear(lin, qcfg, compute_dtype=torch.float16, device="cpu", del_orig=True)
    # Copies, not the state dict's views: a view would keep HQQ's work buffers alive.
    return {k: v.detach().clone() for k, v in q.state_dict().items()}


def _write_config(ckpt: Checkpoint, out: Path, bits: int, group: int, axis: int) -> None:
    """The checkpoint's config.json with HQQ's quantization_config, and its generation/tokenizer files."""
    config = json.loads((ckpt.path / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quant_config(bits, group, axis)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in _COPIED:
        if (ckpt.path / name).is_file():
            shutil.copyfile(ckpt.path / name, out / name)


def _linear_layers(ckpt: Checkpoint) -> tuple[list[str], bool]:
    """Names of the linear layers HQQ quantizes (not the output head), from a weightless model."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=False)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [
        n
        for n, m in skeleton.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in SKIP
    ]
    return names, bool(getattr(config, "tie_word_embeddings", False))


class _Tensors:
    """The checkpoint's tensors by name across its safetensors shards, each read once on demand.

    Read with plain file reads at the header's offsets rather than through a memory map: every
    page of a mapped file that has been touched stays in the process's resident set until the
    map closes, which would add the whole FP16 model to peak RSS by the last layer.
    """

    _DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip

    def __init__(self, ckpt: Checkpoint) -> None:
        self._where = tensor_spans(ckpt.weight_files)
        for name, span in self._where.items():
            if span.dtype not in self._DTYPES:
                raise InputError(
                    f"{span.path.name}: tensor {name} has dtype {span.dtype}, which HQQ cannot read"
                )

    def __enter__(self) -> _Tensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._where.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def take(self, name: str) -> Any:
        import torch

        if name not in self._where:
            raise InputError(f"the checkpoint has no tensor {name!r}; HQQ cannot map its layers to weights")
        span = self._where.pop(name)
        dt = getattr(torch, self._DTYPES[span.dtype])
        if span.size == 0:
            return torch.empty(span.shape, dtype=dt)
        buf = bytearray(span.size)
        with open(span.path, "rb") as fh:
            fh.seek(span.offset)
            if fh.readinto(buf) != span.size:
                raise InputError(f"{span.path.name}: tensor {name} is truncated")
        return torch.frombuffer(buf, dtype=dt).reshape(span.shape)

    def left(self) -> list[str]:
        return list(self._where)


def _packing(bits: int) -> str:
    from hqq.core.quantize import Quantizer

    return str(Quantizer.bit_to_packing[bits])


BACKEND = HQQBackend
