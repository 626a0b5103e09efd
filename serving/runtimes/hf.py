"""FP16 checkpoints through transformers: the reference runtime of the evaluator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.serving.runtimes.base import Runtime, Sampling, Token


def _has_llguidance() -> bool:
    from orlik.serving.constrained import available

    return available()


class HFRuntime(Runtime):
    name = "transformers"
    formats = ("fp16",)
    supports_json_schema = _has_llguidance()

    def __init__(self, ckpt: Checkpoint, model: Any, tokenizer: Any, threads: int | None) -> None:
        self.ckpt, self.model, self.tok = ckpt, model, tokenizer
        self.threads = threads
        # Whether the tokenizer's own post-processor adds BOS (transformers 5 has no add_bos_token flag).
        probe = tokenizer.encode("a", add_special_tokens=True)
        self._adds_bos = (
            bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
        )

    @classmethod
    def missing(cls) -> str | None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            return 'transformers/torch are not installed; pip install "orlik[train]"'
        return None

    @classmethod
    def load(cls, source: Variant | Checkpoint, **options: Any) -> HFRuntime:
        import torch

        if isinstance(source, Variant):
            raise InputError(f"{source.name} is a {source.format} variant, not an FP16 checkpoint")
        threads = options.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        # fp32 compute over the fp16 weights: exact weights, no fp16 accumulation error in the reference.
        model = source.load_model(dtype=torch.float32)
        return cls(source, model, source.load_tokenizer(), threads)

    @property
    def n_ctx(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def n_vocab(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def bos_id(self) -> int | None:
        return self.tok.bos_token_id

    @property
    def eos_ids(self) -> set[int]:
        ids = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None:
                ids.add(int(e))
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        return ids

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        ids: list[int] = self.tok.encode(text, add_special_tokens=False, split_special_tokens=not special)
        if add_bos and self._adds_bos:
            ids = [self.bos_id, *ids]
        return ids

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tok.decode(tokens, skip_special_tokens=False))

    def token_piece(self, token: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(int(token))
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        if "\u2581" in piece:
            # SentencePiece marks spaces with U+2581; convert_tokens_to_string would drop the leading one.
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tok.convert_tokens_to_string([piece]).encode("utf-8") if piece else b""

    def logits(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([tokens], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def logits_from(self, tokens: list[int], first: int) -> np.ndarray:
        # logits_to_keep applies the output layer to the last positions only (the evaluator's second half).
        import torch

        if first >= len(tokens):
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        with torch.inference_mode():
            out = self.model(torch.tensor([tokens], dtype=torch.long), use_cache=False,
                             logits_to_keep=max(1, len(tokens) - first))  # fmt: skip
        return out.logits[0].float().numpy()

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        """Sample token by token from `step`'s logits: the loop every in-process runtime shares."""
        from orlik.serving.sampling import Sampler

        eos = self.eos_ids
        constraint = None
        if sampling.json_schema is not None:
            from orlik.serving.constrained import json_constraint

            constraint = json_constraint(self.tok, sampling.json_schema, self.n_vocab, eos)
        sampler = Sampler(sampling, tokens, constraint)
        step = self.stepper(tokens)
        logits = step(None)
        for _ in range(sampling.max_tokens):
            if sampling.ignore_eos:
                logits[list(eos)] = -np.inf
            t = sampler.sample(logits)
            yield t
            if t.id in eos:
                return
            logits = step(t.id)

    def stepper(self, tokens: list[int]) -> Callable[[int | None], np.ndarray]:
        """step(None) -> float32 logits after the prompt; step(t) feeds t and returns the next ones.
        Keeps its own KV cache; subclasses with another framework override only this."""
        import torch

        state: dict[str, Any] = {"past": None}

        def step(token: int | None) -> np.ndarray:
            inp = torch.tensor([tokens if token is None else [token]], dtype=torch.long)
            with torch.inference_mode():
                out = self.model(inp, past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[0, -1].float().numpy()

        return step


RUNTIME = HFRuntime
