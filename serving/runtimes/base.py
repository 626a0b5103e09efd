"""The Runtime interface shared by the evaluator and the server, and the format -> runtime table.

One runtime per format family loads a variant (or an FP16 checkpoint) and offers tokenization,
full-vocabulary logits for evaluation, and token streaming for serving. Benchmarks and the server
use the same runtimes, so a format is measured exactly the way it is served.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError, UnknownNameError
from orlik.manifest import MANIFEST, Variant

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Sampling:
    """Decoding parameters, OpenAI-style. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives to return per token, or None
    grammar: str | None = None  # GBNF grammar, where the runtime supports constrained decoding
    json_schema: dict[str, Any] | None = None
    ignore_eos: bool = False  # never sample EOS: exactly max_tokens tokens (benchmarks)


@dataclass
class Token:
    """One generated token with what the API may need to report about it."""

    id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    # The text this token completes, when the runtime detokenizes natively (llama-server); None lets
    # the caller detokenize incrementally.
    text: str | None = None


class Runtime(ABC):
    """A loaded model. Subclasses register a name in RUNTIME_MODULES and implement the methods."""

    name: str = ""
    formats: tuple[str, ...] = ()
    # Whether generate() honours Sampling.json_schema with constrained decoding; a server rejects
    # response_format json_schema for runtimes that cannot (rather than hoping the text parses).
    supports_json_schema: bool = False

    @classmethod
    def missing(cls) -> str | None:
        """Why this runtime cannot run here (with the install hint), or None if it can."""
        return None

    @classmethod
    @abstractmethod
    def load(cls, source: Variant | Checkpoint, **options: Any) -> Runtime: ...

    @property
    @abstractmethod
    def n_ctx(self) -> int: ...

    @property
    @abstractmethod
    def n_vocab(self) -> int: ...

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_ids(self) -> set[int]:
        return set()

    @abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]: ...

    @abstractmethod
    def detokenize(self, tokens: list[int]) -> str: ...

    def token_piece(self, token: int) -> bytes:
        """The raw bytes of one token, for incremental UTF-8-safe streaming."""
        return self.detokenize([token]).encode("utf-8")

    @abstractmethod
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position, float32 [len(tokens), n_vocab], one forward pass from scratch."""

    def logits_from(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits of positions first..len(tokens)-1 only (the evaluator scores the second half of
        each chunk). Runtimes that can skip the output layer for the other positions override it."""
        return self.logits(tokens)[first:]

    @abstractmethod
    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        """Stream sampled tokens after the prompt; stops at EOS or max_tokens."""

    def alive(self) -> bool:
        """False once a runtime that runs out of process (llama-server) has died; a server reloads it."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free native resources; the default has nothing to free."""


# format -> module under orlik.serving.runtimes; modules import only when a format is used.
RUNTIME_MODULES: dict[str, str] = {
    "fp16": "hf",
    "gguf": "llamacpp",
    "gptq": "hfquant",
    "awq": "hfquant",
    "hqq": "hqq",
    "mlx": "mlx",
}


def runtime_class(fmt: str) -> type[Runtime]:
    try:
        module = RUNTIME_MODULES[fmt]
    except KeyError:
        raise UnknownNameError("format", fmt, list(RUNTIME_MODULES)) from None
    mod = importlib.import_module(f"orlik.serving.runtimes.{module}")
    cls: type[Runtime] = mod.RUNTIME
    why = cls.missing()
    if why:
        raise MissingDependencyError(why)
    return cls


def open_source(path: str | Path) -> Variant | Checkpoint:
    """A variant directory (has variant.json) or an FP16 checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist")
    if (p / MANIFEST).is_file():
        return Variant.load(p)
    return Checkpoint.open(p)


def load_runtime(path: str | Path, **options: Any) -> Runtime:
    """Load whatever is at `path` with the runtime for its format."""
    src = open_source(path)
    fmt = src.format if isinstance(src, Variant) else "fp16"
    return runtime_class(fmt).load(src, **options)
