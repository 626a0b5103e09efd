"""MLX variants through mlx-lm: Metal on Apple Silicon, mlx-cpu on Linux.

Weights stay in MLX's packed affine layout and run through `quantized_matmul`; tokenization is the
variant's Hugging Face tokenizer, exactly as for the other Python runtimes, and sampling is
orlik's numpy sampler, so every format decodes the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from orlik.checkpoint import Checkpoint, load_tokenizer
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.serving.runtimes.hf import HFRuntime


class MLXRuntime(HFRuntime):
    name = "mlx-lm"
    formats = ("mlx",)

    def __init__(self, source: Variant, model: Any, tokenizer: Any, config: dict[str, Any]) -> None:
        self.config = config
        super().__init__(source, model, tokenizer, None)  # type: ignore[arg-type]

    @classmethod
    def missing(cls) -> str | None:
        import importlib.util

        absent = [m for m in ("mlx", "mlx_lm", "transformers") if importlib.util.find_spec(m) is None]
        return f'{", ".join(absent)} not installed; pip install "orlik[mlx]"' if absent else None

    @classmethod
    def load(cls, source: Variant | Checkpoint, **options: Any) -> MLXRuntime:
        from mlx_lm.utils import load_model

        if not isinstance(source, Variant) or source.format != "mlx" or source.path is None:
            raise InputError(f"{getattr(source, 'path', source)} is not an MLX variant")
        import mlx.core as mx

        model, config = load_model(source.path, lazy=False)
        # mlx-cpu runs float16 ~30x slower than float32 (measured on the tiny model); the packed
        # weights are untouched, only scales, biases and dense tensors are widened.
        dtype = options.get("dtype") or ("float32" if mx.default_device() == mx.cpu else None)
        if dtype:
            model.set_dtype(getattr(mx, str(dtype)))
        tok = load_tokenizer(source.path)
        return cls(source, model, tok, config)

    @property
    def n_ctx(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))

    @property
    def n_vocab(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def eos_ids(self) -> set[int]:
        eos = self.config.get("eos_token_id")
        ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        return ids

    def logits(self, tokens: list[int]) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array([tokens]))
        return np.array(out[0].astype(mx.float32))

    def logits_from(self, tokens: list[int], first: int) -> np.ndarray:
        # The base class's way; HFRuntime's override (from which this class takes its tokenizer and
        # sampling loop) runs a torch model.
        return self.logits(tokens)[first:]

    def stepper(self, tokens: list[int]) -> Callable[[int | None], np.ndarray]:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)

        def step(token: int | None) -> np.ndarray:
            out = self.model(mx.array([tokens if token is None else [token]]), cache=cache)
            return np.array(out[0, -1].astype(mx.float32))

        return step

    def resident_weight_bytes(self) -> int:
        from mlx.utils import tree_flatten

        return sum(int(v.nbytes) for _, v in tree_flatten(self.model.parameters()))


RUNTIME = MLXRuntime
