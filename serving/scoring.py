"""Prompt log-probabilities on /v1/completions (`echo` + `logprobs`) and GET /tokenizer_info.

This is what lm-evaluation-harness's `local-completions` model needs to score multiple-choice tasks
against a served model, in the shape vLLM's legacy completions return: the prompt's tokens first
(the first with a null logprob), then the generated ones. Prompt log-probabilities come from the
runtime's full-vocabulary `logits()`, the same call `orlik bench` scores with. Where the server's
runtime has no logits (GGUF runs in llama-server, which refuses `echo`), the evaluator's runtime
for that format (in-process llama.cpp on the same .gguf) is loaded beside it on the first scoring
request and freed with the served runtime.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from orlik import registry
from orlik.serving.engine import Event, GenRequest, RequestTimeout, TokenLogprob
from orlik.serving.formats import CompletionFormat
from orlik.serving.models import ServedModel
from orlik.serving.runtimes.base import Runtime
from orlik.serving.schemas import error_responses

router = APIRouter()


@dataclass
class Scorer:
    """The runtime that gives logits for a served model, and a lock where it is not thread-safe."""

    runtime: Runtime
    lock: threading.Lock | None


_scorers: weakref.WeakKeyDictionary[Runtime, Scorer] = weakref.WeakKeyDictionary()
_scorers_lock = threading.Lock()


def scorer_for(model: ServedModel, served: Runtime, threads: int | None = None) -> Scorer:
    """The served runtime itself when it has logits; else the evaluator's runtime for the format,
    loaded once and closed when the served runtime is dropped (unloaded or restarted)."""
    if registry.runtime_class(model.format, serving=True) is registry.runtime_class(model.format):
        return Scorer(served, None)
    with _scorers_lock:
        found = _scorers.get(served)
        if found is None:
            cls = registry.runtime_class(model.format)
            rt = cls.load(model.source, n_ctx=served.n_ctx, threads=threads)
            found = _scorers[served] = Scorer(rt, threading.Lock())  # one llama.cpp context
            weakref.finalize(served, rt.close)
        return found


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _piece(rt: Runtime, tid: int) -> tuple[str, list[int]]:
    b = rt.token_piece(int(tid))
    return b.decode("utf-8", errors="replace"), list(b)


def prompt_logprobs(scorer: Scorer, prompt: list[int], k: int) -> tuple[list[TokenLogprob], np.ndarray]:
    """Each prompt token's log-probability given the tokens before it (the first has none: NaN),
    with the top `k` alternatives plus the token itself, as vLLM reports them; and the
    log-probabilities after the whole prompt (for a greedy next token without a second pass)."""
    rt = scorer.runtime
    if scorer.lock is not None:
        with scorer.lock:
            logits = rt.logits(prompt)
    else:
        logits = rt.logits(prompt)
    lp = log_softmax(logits)
    out = [TokenLogprob(*_piece(rt, prompt[0]), float("nan"))]
    for i in range(1, len(prompt)):
        row, tid = lp[i - 1], int(prompt[i])
        top_ids = np.argpartition(-row, k)[:k] if 0 < k < row.size else np.arange(row.size)[:k]
        top_ids = [int(t) for t in top_ids[np.argsort(-row[top_ids])]]
        ids = top_ids if tid in top_ids else [*top_ids, tid]
        top = [(*_piece(rt, t), float(row[t])) for t in ids]
        out.append(TokenLogprob(*_piece(rt, tid), float(row[tid]), top))
    return out, lp[-1]


def greedy_token(scorer: Scorer, last: np.ndarray, k: int) -> TokenLogprob:
    """The argmax token after the prompt, from the scoring pass's last row."""
    tid = int(np.argmax(last))
    top_ids = [int(t) for t in np.argsort(-last)[: max(k, 1)]]
    rt = scorer.runtime
    return TokenLogprob(
        *_piece(rt, tid), float(last[tid]), [(*_piece(rt, t), float(last[t])) for t in top_ids]
    )


class EchoFormat(CompletionFormat):
    """CompletionFormat whose logprobs start with the prompt's, as vLLM's echo does."""

    def __init__(self, model: str, *, include_usage: bool, echo: str, prompt: list[TokenLogprob]) -> None:
        super().__init__(model, logprobs=True, include_usage=include_usage, echo=echo)
        self.prompt = prompt
        self.offset = 0  # prompt tokens take offsets from 0; generated ones follow them

    def _logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.prompt:
            lps, self.prompt = [*self.prompt, *lps], []
            d = super()._logprobs(lps)
            assert d is not None
            d["token_logprobs"][0] = None  # the first prompt token has no context to be scored in
            d["top_logprobs"][0] = None
            return d
        return super()._logprobs(lps)

    def start(self) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [
            self._chunk(
                {"index": 0, "text": self.echo, "logprobs": self._logprobs([]), "finish_reason": None}
            )
        ]


async def score(request: Request, st: Any, model: ServedModel, rt: Runtime, prompt: list[int], k: int,
                deadline: float) -> tuple[Scorer, list[TokenLogprob], np.ndarray]:  # fmt: skip
    """The prompt's log-probabilities, computed in one of the model's slots (so the queue, its 429
    and the timeout apply as to generation) on a worker thread."""
    sem = st.registry.semaphore(model)
    await st.scheduler.acquire(sem, deadline)
    st.scheduler.running += 1
    try:
        scorer = await asyncio.to_thread(scorer_for, model, rt, st.registry.threads)
        work = asyncio.to_thread(prompt_logprobs, scorer, prompt, k)
        try:
            return scorer, *await asyncio.wait_for(work, timeout=max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"scoring the prompt ran past the server's {st.scheduler.timeout:g} s timeout"
            ) from None
    finally:
        st.scheduler.running -= 1
        sem.release()


def _greedy_one(gen: GenRequest) -> bool:
    """A request whose one generated token is the argmax after the prompt (lm-eval's scoring call:
    max_tokens 1, temperature 0): the scoring pass already has it."""
    s = gen.sampling
    return (
        s.max_tokens == 1 and (s.temperature == 0 or s.top_k == 1) and s.json_schema is None and not gen.stop
    )


async def echo_completion(request: Request, st: Any, model: ServedModel, rt: Runtime, gen: GenRequest, echo: str,
                          include_usage: bool, stream: bool, t0: float) -> Response:  # fmt: skip
    """/v1/completions with echo and logprobs: the prompt's log-probabilities, then the generation.

    The greedy one-token case is answered from the scoring pass, and its token is reported even
    when it is EOS, so the response always holds prompt + max_tokens tokens (lm-eval drops the
    last one by position). Other requests generate as usual after the prompt has been scored.
    """
    from orlik.serving import api

    k = int(gen.logprobs or 0)
    scorer, lps, last = await score(request, st, model, rt, gen.prompt, k, t0 + st.scheduler.timeout)
    fmt = EchoFormat(model.name, include_usage=include_usage, echo=echo, prompt=lps)
    if stream or not _greedy_one(gen):
        return await api._respond(request, st, model, rt, gen, fmt, stream, t0)
    tok = greedy_token(scorer, last, k)
    tid = int(np.argmax(last))
    text = "" if tid in scorer.runtime.eos_ids else tok.token
    usage = {"prompt_tokens": len(gen.prompt), "completion_tokens": 1, "total_tokens": len(gen.prompt) + 1}
    st.metrics.tokens(model.name, len(gen.prompt), 1)
    return JSONResponse(fmt.full([Event(text, [tok], "stop" if text == "" else "length", 1)], usage))


@router.get("/tokenizer_info", responses=error_responses(400, 401, 404))
async def tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
    """The served model's special tokens and chat template, as vLLM reports them; lm-eval's remote
    tokenizer reads this and then tokenizes through /tokenize, with the served model's own tokenizer."""
    from orlik.serving.api import _load

    served, rt = await _load(request, model)
    t = served.template
    eos = t.eos_token or None
    bos = t.bos_token or None
    return {"model": served.name, "bos_token": bos, "eos_token": eos, "pad_token": None,
            "chat_template": t.text, "model_max_length": rt.n_ctx, "vocab_size": rt.n_vocab}  # fmt: skip
