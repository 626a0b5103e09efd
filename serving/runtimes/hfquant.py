"""GPTQ and AWQ variants through transformers, whose GPTQ/AWQ integration runs GPTQModel's kernels.

On CPU GPTQModel picks its torch kernels: 4-bit weights are repacked once at load into the int4
layout of aten's `_weight_int4pack_mm_for_cpu` and stay packed; other widths keep the GPTQ packing
and are unpacked one layer at a time inside each forward. No FP16 copy of a quantized weight is
kept, which `resident_weight_bytes` lets a caller check.
"""

from __future__ import annotations

import os
from typing import Any

from orlik.checkpoint import Checkpoint, load_tokenizer
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.serving.runtimes.hf import HFRuntime
from orlik.sysinfo import usable_cores


def resident_tensor_bytes(root: Any) -> int:
    """Bytes of every distinct tensor a module tree keeps: parameters, buffers, and tensors held in
    plain attributes or dicts (where kernels cache repacked or dequantized weights)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()

    for mod in root.modules():
        for v in vars(mod).values():
            if isinstance(v, dict):
                for x in v.values():
                    if isinstance(x, dict):
                        for y in x.values():
                            add(y)
                    else:
                        add(x)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    add(x)
            else:
                add(v)
    return total


class TransformersQuantRuntime(HFRuntime):
    name = "transformers+gptqmodel"
    formats = ("gptq", "awq")

    @classmethod
    def missing(cls) -> str | None:
        import importlib.util

        absent = [
            m
            for m in ("torch", "transformers", "gptqmodel", "optimum")
            if importlib.util.find_spec(m) is None
        ]
        return f'{", ".join(absent)} not installed; pip install "orlik[gptq]"' if absent else None

    @classmethod
    def load(cls, source: Variant | Checkpoint, **options: Any) -> TransformersQuantRuntime:
        import torch
        from transformers import AutoModelForCausalLM

        if not isinstance(source, Variant) or source.format not in cls.formats or source.path is None:
            raise InputError(f"{getattr(source, 'path', source)} is not a GPTQ or AWQ variant")
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(usable_cores()))
        threads = options.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        # GPTQModel's CPU kernels compute in bfloat16 (they convert scales at load); the dense
        # tensors follow, as float16 matmuls are several times slower on CPU.
        dtype = getattr(torch, str(options.get("dtype", "bfloat16")))
        try:  # safetensors only: a variant's pickle files are never unpickled
            model = AutoModelForCausalLM.from_pretrained(
                str(source.path), device_map="cpu", dtype=dtype, trust_remote_code=False, use_safetensors=True
            )
        except OSError as e:
            raise InputError(f"cannot load {source.path}: {str(e).strip().splitlines()[0]}") from None
        model.eval()
        tok = load_tokenizer(source.path)
        return cls(source, model, tok, threads)  # type: ignore[arg-type]

    def resident_weight_bytes(self) -> int:
        return resident_tensor_bytes(self.model)


RUNTIME = TransformersQuantRuntime
