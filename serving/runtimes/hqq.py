"""HQQ variants: a transformers model skeleton whose quantized linears are hqq's HQQLinear, filled
from the variant's safetensors (the layout of quantize/backends/hqq.py).

HQQLinear keeps the bit-packed weights and FP16 scales/zeros and dequantizes one layer at a time
inside each forward (hqq's PYTORCH backend), so no full-precision copy stays resident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orlik.checkpoint import Checkpoint, load_tokenizer
from orlik.errors import InputError, ManifestError
from orlik.manifest import Variant
from orlik.serving.runtimes.hf import HFRuntime
from orlik.serving.runtimes.hfquant import resident_tensor_bytes

WEIGHTS = "model.safetensors"


class HQQRuntime(HFRuntime):
    name = "hqq"
    formats = ("hqq",)

    @classmethod
    def missing(cls) -> str | None:
        import importlib.util

        absent = [
            m for m in ("torch", "transformers", "hqq", "accelerate") if importlib.util.find_spec(m) is None
        ]
        return f'{", ".join(absent)} not installed; pip install "orlik[hqq]"' if absent else None

    @classmethod
    def load(cls, source: Variant | Checkpoint, **options: Any) -> HQQRuntime:
        import torch

        if not isinstance(source, Variant) or source.format != "hqq" or source.path is None:
            raise InputError(f"{getattr(source, 'path', source)} is not an HQQ variant")
        threads = options.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        # bfloat16 on CPU: twice as fast as float16 there and the packed size stays as stored;
        # dtype="float32" computes exactly at the cost of upcasting scales and dense tensors.
        dtype = getattr(torch, str(options.get("dtype", "bfloat16")))
        model = load_model(source.path, dtype)
        tok = load_tokenizer(source.path)
        return cls(source, model, tok, threads)  # type: ignore[arg-type]

    def resident_weight_bytes(self) -> int:
        return resident_tensor_bytes(self.model)


def load_model(path: Path, dtype: Any) -> Any:
    """Build the architecture with no weights allocated, then place HQQLinear and dense tensors."""
    from accelerate import init_empty_weights
    from hqq.core.quantize import HQQBackend, HQQLinear
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) != "hqq":
        raise ManifestError(f"{path}/config.json has no HQQ quantization_config")
    # transformers 5 has no loader for HQQ checkpoints: build a plain model and fill it here.
    del config.quantization_config
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    # Parameters on the meta device (no memory); buffers such as rotary frequencies are real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    state = load_file(str(path / WEIGHTS))
    prefixes = sorted(k[: -len(".W_q")] for k in state if k.endswith(".W_q"))
    if not prefixes:
        raise ManifestError(f"{path / WEIGHTS} holds no HQQ layers")
    for prefix in prefixes:
        parent_name, _, child = prefix.rpartition(".")
        sub = {k[len(prefix) + 1 :]: state.pop(k) for k in [k for k in state if k.startswith(prefix + ".")]}
        q = HQQLinear(None, None, compute_dtype=dtype, device="cpu", initialize=False)
        q.load_state_dict(sub)
        setattr(model.get_submodule(parent_name), child, q)
    dense = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:
        raise ManifestError(
            f"{path / WEIGHTS} has tensors the model lacks: {', '.join(result.unexpected_keys[:3])}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ManifestError(f"{path / WEIGHTS} lacks weights for {', '.join(left[:3])}")
    model.eval()
    return model


RUNTIME = HQQRuntime
