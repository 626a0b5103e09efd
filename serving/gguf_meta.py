"""The few GGUF metadata fields the server needs before (or without) loading a model.

Chat template, special tokens and the shapes for a KV-cache memory estimate, read with gguf-py
(memory-mapped; no tensor data is touched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from orlik.errors import InputError, MissingDependencyError


@dataclass
class GGUFMeta:
    arch: str
    n_ctx_train: int
    n_vocab: int
    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    chat_template: str | None
    bos_id: int | None
    bos_token: str
    eos_token: str
    eos_ids: set[int] = field(default_factory=set)

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V for every layer: what one token of context costs in llama.cpp's cache."""
        head_dim = self.n_embd // max(1, self.n_heads)
        return 2 * 2 * self.n_layers * self.n_kv_heads * head_dim

    @staticmethod
    def read(path: Path) -> GGUFMeta:
        return _read(str(Path(path).resolve()))


@lru_cache(maxsize=16)
def _read(path: str) -> GGUFMeta:
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError(
            'reading GGUF metadata needs gguf-py; pip install "orlik[gguf]"'
        ) from None
    try:
        r = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path} is not a readable GGUF file: {e}") from None

    def get(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = str(get("general.architecture", ""))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else int(get(f"{arch}.vocab_size", 0))

    def tok_text(i: Any) -> str:
        if i is None or tokens is None or not 0 <= int(i) < n_vocab:
            return ""
        return str(tokens.contents(int(i)))

    bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    eos_ids = {
        int(v) for k in ("eos", "eot", "eom") if (v := get(f"tokenizer.ggml.{k}_token_id")) is not None
    }
    n_heads = int(get(f"{arch}.attention.head_count", 1) or 1)
    return GGUFMeta(
        arch=arch,
        n_ctx_train=int(get(f"{arch}.context_length", 0) or 0),
        n_vocab=n_vocab,
        n_layers=int(get(f"{arch}.block_count", 0) or 0),
        n_embd=int(get(f"{arch}.embedding_length", 0) or 0),
        n_heads=n_heads,
        n_kv_heads=int(get(f"{arch}.attention.head_count_kv", n_heads) or n_heads),
        chat_template=get("tokenizer.chat_template"),
        bos_id=None if bos is None else int(bos),
        bos_token=tok_text(bos),
        eos_token=tok_text(eos),
        eos_ids=eos_ids,
    )
