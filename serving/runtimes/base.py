"""The Runtime interface shared by the evaluator and the server.

One runtime per format family loads a variant (or an FP16 checkpoint) and offers tokenization,
full-vocabulary logits for evaluation, and token streaming for serving. orlik.registry finds the
runtime of a format; benchmarks and the server use the same runtimes, with the one exception that
registry documents (GGUF is served by llama-server and evaluated in-process, on one llama.cpp).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orlik import registry
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError
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


class TokenStream(ABC):
    """A generation read on the server's event loop itself, with no worker thread and no hand-off
    per token: what a runtime whose tokens arrive over a socket (llama-server) offers through
    Runtime.stream(). The caller takes tokens when it is ready to send, so a fast model's tokens
    are parsed in bursts."""

    ended: bool = False  # the runtime's own stream has ended (its final event was read)

    @abstractmethod
    async def start(self) -> None:
        """Connect and send the request."""

    @abstractmethod
    def take(self) -> list[Token]:
        """The tokens received and not yet taken; never waits. Raises the runtime's error."""

    @abstractmethod
    async def wait(self, timeout: float | None = None) -> None:
        """Until more has been received or the stream has ended; raises the runtime's error if it
        failed (a dead child, say). Returns at once after close(). With `timeout` (seconds): until
        then, or sooner if the stream ends; never raises (the next wait() does)."""

    @abstractmethod
    def close(self) -> None:
        """Stop generating for this request (idempotent; on the event loop's thread)."""


class Runtime(ABC):
    """A loaded model. A module under serving/runtimes defines one as `RUNTIME` (see orlik.registry)."""

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

    def stream(self, tokens: list[int], sampling: Sampling) -> TokenStream | None:
        """The generation as a TokenStream read on the event loop, or None: the server then runs
        generate() in a worker thread."""
        return None

    def alive(self) -> bool:
        """False once a runtime that runs out of process (llama-server) has died; a server reloads it."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free native resources; the default has nothing to free."""


def runtime_class(fmt: str, *, serving: bool = False) -> type[Runtime]:
    """The runtime for `fmt` (the server's with serving=True); MissingDependencyError if it cannot run here."""
    cls: type[Runtime] = registry.runtime_class(fmt, serving=serving)
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
