"""Token sampling over a logits vector: penalties, temperature, top-k, top-p, min-p, logprobs.

Used by runtimes that do not sample natively (transformers and the other Python runtimes), so
every format honours the same OpenAI parameters the same way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from orlik.serving.runtimes.base import Sampling, Token


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


class Sampler:
    """Stateful per request: it remembers the generated tokens for the penalties and owns the RNG."""

    def __init__(self, sampling: Sampling, prompt: list[int], constraint: Any = None) -> None:
        self.s = sampling
        # numpy wants a non-negative seed; OpenAI clients may send any integer.
        self.rng = np.random.default_rng(None if sampling.seed is None else sampling.seed % 2**32)
        # Optional grammar (serving/constrained.py): mask(logits) before sampling, advance(token) after.
        self.constraint = constraint
        self.prompt = list(prompt)
        self.counts: Counter[int] = Counter()

    def _penalize(self, logits: np.ndarray) -> np.ndarray:
        s = self.s
        if s.repetition_penalty != 1.0:
            # llama.cpp/HF semantics: divide positive logits and multiply negative ones, over the
            # tokens seen in the prompt and the output.
            seen = np.fromiter(set(self.prompt) | set(self.counts), dtype=np.int64)
            if seen.size:
                v = logits[seen]
                logits[seen] = np.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
        if (s.presence_penalty or s.frequency_penalty) and self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            cnt = np.fromiter(self.counts.values(), dtype=np.float64)
            logits[ids] -= s.frequency_penalty * cnt + s.presence_penalty
        return logits

    def sample(self, logits: np.ndarray) -> Token:
        raw = log_softmax(logits)
        x = self._penalize(np.array(logits, dtype=np.float64))
        if self.constraint is not None:
            self.constraint.mask(x)
        s = self.s
        # Temperatures this small are greedy in effect, and dividing by them overflows to inf/NaN.
        if s.temperature <= 1e-4:
            tok = int(np.argmax(x))
        else:
            x = x / s.temperature
            if s.top_k and 0 < s.top_k < x.size:
                kth = np.partition(x, -s.top_k)[-s.top_k]
                x = np.where(x < kth, -np.inf, x)
            p = np.exp(log_softmax(x))
            if s.min_p > 0:
                p = np.where(p < s.min_p * p.max(), 0.0, p)
            if s.top_p < 1.0:
                order = np.argsort(-p)
                cum = np.cumsum(p[order])
                cut = order[np.searchsorted(cum, s.top_p * cum[-1]) + 1 :]
                p[cut] = 0.0
            p = p / p.sum()
            tok = int(self.rng.choice(p.size, p=p))
        self.counts[tok] += 1
        if self.constraint is not None:
            self.constraint.advance(tok)
        top: list[tuple[int, float]] = []
        if s.logprobs:
            k = min(s.logprobs, raw.size)
            idx = np.argpartition(-raw, k - 1)[:k]
            idx = idx[np.argsort(-raw[idx])]
            top = [(int(i), float(raw[i])) for i in idx]
        return Token(id=tok, logprob=float(raw[tok]), top_logprobs=top)
