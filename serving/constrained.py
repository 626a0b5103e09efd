"""JSON-schema constrained decoding for runtimes that sample in Python (transformers and friends).

llguidance compiles the schema into a token-level grammar over the model's own tokenizer; at each
step the sampler masks every token the grammar cannot accept, so the output always parses (unless
max_tokens cuts it short, which finish_reason "length" then says). GGUF models get the same through
llama.cpp's grammar sampler in llama-server instead.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from orlik.errors import InputError, MissingDependencyError

# Compact JSON: a small model given free whitespace tends to spend its whole budget on it.
_COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_HINT = 'constrained output needs llguidance; pip install "orlik[serve]"'

_tokenizers: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (hf tokenizer, LLTokenizer)
_lock = threading.Lock()


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def compile_schema(schema: dict[str, Any]) -> str:
    """The llguidance grammar for a JSON schema; an InputError (a 400) if the schema is unusable."""
    try:
        import llguidance
    except ImportError:
        raise MissingDependencyError(_HINT) from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides=_COMPILE_OPTIONS
        )
    except (ValueError, TypeError) as e:
        raise InputError(f"response_format json_schema is not a usable JSON schema: {e}") from None
    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err:
        raise InputError(f"response_format json_schema is not supported: {err.splitlines()[0]}")
    return grammar


def _ll_tokenizer(hf_tokenizer: Any, n_vocab: int, eos_ids: set[int]) -> Any:
    import llguidance.hf

    # Building the token trie takes ~0.1-1 s, so it is made once per tokenizer.
    with _lock:
        hit = _tokenizers.get(id(hf_tokenizer))
        if hit is None or hit[0] is not hf_tokenizer:
            eos = sorted(eos_ids) or None
            lt = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=eos)
            hit = (hf_tokenizer, lt)
            _tokenizers[id(hf_tokenizer)] = hit
        return hit[1]


class JsonConstraint:
    """Per-request grammar state: masks the logits before sampling and advances on each token."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self.m = matcher
        self.n_vocab = n_vocab

    def mask(self, logits: np.ndarray) -> None:
        """Set every token the grammar cannot take next to -inf, in place."""
        allowed = np.frombuffer(self.m.compute_logit_bias(), dtype=np.uint8)[: logits.size]
        if self.m.is_error():
            raise InputError(f"constrained decoding failed: {self.m.get_error()}")
        logits[: allowed.size][allowed == 0] = -np.inf
        logits[allowed.size :] = -np.inf

    def advance(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise InputError(f"constrained decoding failed: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and accepts nothing more than end of text."""
        return bool(self.m.is_stopped())


def json_constraint(
    hf_tokenizer: Any, schema: dict[str, Any], n_vocab: int, eos_ids: set[int]
) -> JsonConstraint:
    import llguidance

    grammar = compile_schema(schema)
    matcher = llguidance.LLMatcher(_ll_tokenizer(hf_tokenizer, n_vocab, eos_ids), grammar)
    if matcher.is_error():
        raise InputError(f"response_format json_schema is not supported: {matcher.get_error()}")
    return JsonConstraint(matcher, n_vocab)
