"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, tokenize."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from orlik.serving import http_errors, scoring
from orlik.serving.engine import Event, GenRequest, Run, Scheduler
from orlik.serving.faults import unless_gone
from orlik.serving.formats import ChatFormat, CompletionFormat
from orlik.serving.metrics import Metrics
from orlik.serving.models import ModelRegistry, ServedModel
from orlik.serving.prompts import (
    BadRequest,
    chat_prompt,
    check_text,
    completion_prompt,
    context_length,
    gen_request,
)
from orlik.serving.runtimes.base import Runtime
from orlik.serving.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    error_responses,
)

if TYPE_CHECKING:
    from orlik.serving.streamrun import StreamRun

router = APIRouter()
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


@dataclass
class ServerState:
    registry: ModelRegistry
    scheduler: Scheduler
    metrics: Metrics
    n_ctx: int | None = None
    _tok_locks: dict[str, threading.Lock] = field(default_factory=dict)

    def tok_lock(self, name: str) -> threading.Lock:
        # HF fast tokenizers are not safe to encode from several threads at once.
        return self._tok_locks.setdefault(name, threading.Lock())


def _state(request: Request) -> ServerState:
    st: ServerState = request.app.state.orlik
    return st


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _load(request: Request, name: str | None) -> tuple[ServedModel, Runtime]:
    st = _state(request)
    if name is None:
        if len(st.registry.models) != 1:
            raise BadRequest(f"name a model; served: {', '.join(st.registry.names())}", "model")
        name = st.registry.names()[0]
    model = st.registry.get(name)
    request.state.model = model.name
    # The lease comes first: a model that a request waits for is never unloaded to make room for
    # another. The app releases it when the response has been sent, whatever happened.
    request.state.lease = _Lease(model)
    rt = model.runtime
    if rt is not None and rt.alive():
        return model, await st.registry.ensure_loaded(model)
    with st.scheduler.waiting_for_load(model.name, st.registry.parallel):
        load = asyncio.shield(st.registry.ensure_loaded(model))  # others may wait for the same load
        return model, await unless_gone(load, request.is_disconnected)


async def _in_thread(st: ServerState, model: ServedModel, fn: Any, *args: Any) -> Any:
    def locked() -> Any:
        with st.tok_lock(model.name):
            return fn(*args)

    return await asyncio.to_thread(locked)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [m.card() for m in _state(request).registry.models.values()]}


@router.get("/v1/models/{model_id}", responses=error_responses(401, 404))
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    return _state(request).registry.get(model_id).card()


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletion, "content": _STREAM}, **error_responses(400, 401, 404, 413, 429, 503, 504)})  # fmt: skip
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    t0 = time.monotonic()
    st = _state(request)
    model, rt = await _load(request, body.model)
    prompt = await _in_thread(st, model, chat_prompt, model, rt, body.messages)
    gen = gen_request(body, model, rt, prompt, context_length(model, rt, st.n_ctx))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    fmt = ChatFormat(model.name, logprobs=gen.logprobs is not None, include_usage=include_usage)
    return await _respond(request, st, model, rt, gen, fmt, body.stream, t0)


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": Completion, "content": _STREAM}, **error_responses(400, 401, 404, 413, 429, 503, 504)})  # fmt: skip
async def completions(body: CompletionRequest, request: Request) -> Response:
    t0 = time.monotonic()
    st = _state(request)
    model, rt = await _load(request, body.model)
    prompt = await _in_thread(st, model, completion_prompt, rt, body.prompt)
    gen = gen_request(body, model, rt, prompt, context_length(model, rt, st.n_ctx))
    echo = ""
    if body.echo:
        echo = (
            body.prompt
            if isinstance(body.prompt, str)
            else await _in_thread(st, model, rt.detokenize, prompt)
        )
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            echo = str(body.prompt[0])
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    fmt = CompletionFormat(
        model.name, logprobs=gen.logprobs is not None, include_usage=include_usage, echo=echo
    )
    if body.echo and gen.logprobs is not None:  # prompt logprobs, as lm-eval's local-completions reads them
        return await scoring.echo_completion(
            request, st, model, rt, gen, echo, include_usage, body.stream, t0
        )
    return await _respond(request, st, model, rt, gen, fmt, body.stream, t0)


class _Lease:
    """The request's claim on its model and generation; released exactly once, however it ends."""

    def __init__(self, model: ServedModel) -> None:
        self.model, self.run, self.done = model, None, False
        model.active += 1

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.model.active -= 1
            if self.run is not None:
                self.run.cancel.set()  # the worker stops at its next token and frees the slot


class _Body:
    """The SSE body iterator. If the client leaves before Starlette starts iterating, the generator
    never runs its `finally`; dropping this object still releases the lease."""

    def __init__(self, agen: AsyncIterator[str], lease: _Lease) -> None:
        self.agen, self.lease = agen, lease

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> str:
        return await self.agen.__anext__()

    def __del__(self) -> None:
        self.lease.release()


async def _respond(request: Request, st: ServerState, model: ServedModel, rt: Runtime, gen: GenRequest,
                   fmt: ChatFormat | CompletionFormat, stream: bool, t0: float) -> Response:  # fmt: skip
    lease: _Lease = request.state.lease
    try:
        lease.run = run = await st.scheduler.start(
            rt, st.registry.semaphore(model), gen, t0 + st.scheduler.timeout, request.is_disconnected
        )
        # The first event decides the status: an error before any output is still a plain HTTP error.
        first = await run.next()
    except BaseException:
        lease.release()
        raise
    usage = {"prompt_tokens": len(gen.prompt)}
    if stream:
        body = _Body(_sse(request, st, model, run, first, fmt, usage, lease), lease)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    try:
        events = await _collect(request, run, first)
    finally:
        lease.release()
    if events is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    last = events[-1]
    _account(request, st, model, usage, last, run)
    return JSONResponse(fmt.full(events, usage))


async def _collect(request: Request, run: Run | StreamRun, first: Event | None) -> list[Event] | None:
    """All events of a non-streaming request; None if the client disconnected meanwhile."""

    async def gather() -> list[Event]:
        evs: list[Event] = [] if first is None else [first]
        while evs and evs[-1].finish_reason is None:
            ev = await run.next()
            if ev is None:
                break
            evs.append(ev)
        return evs

    task = asyncio.ensure_future(gather())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            run.cancel.set()
            return None


def _account(
    request: Request,
    st: ServerState,
    model: ServedModel,
    usage: dict[str, int],
    last: Event,
    run: Run | StreamRun,
) -> None:
    usage["completion_tokens"] = last.completion_tokens
    usage["total_tokens"] = usage["prompt_tokens"] + last.completion_tokens
    st.metrics.tokens(model.name, usage["prompt_tokens"], last.completion_tokens)
    if run.first_token_at is not None:
        request.state.ttft = run.first_token_at - run.started


async def _sse(request: Request, st: ServerState, model: ServedModel, run: Run | StreamRun, first: Event | None,
               fmt: ChatFormat | CompletionFormat, usage: dict[str, int], lease: _Lease) -> AsyncIterator[str]:  # fmt: skip
    try:
        for chunk in fmt.start():
            yield f"data: {_dumps(chunk)}\n\n"
        ev = first
        while ev is not None:
            yield fmt.sse(ev)
            if ev.finish_reason is not None:
                _account(request, st, model, usage, ev, run)
                if fmt.include_usage:
                    yield f"data: {_dumps(fmt.usage_chunk(usage))}\n\n"
                break
            ev = await run.next_merged(st.scheduler.stream_interval)
        yield "data: [DONE]\n\n"
    except Exception as e:
        # Headers are sent: report in the stream, as OpenAI does (the openai client raises on it).
        status, payload, _ = http_errors.for_exception(e)
        request.state.stream_error = status
        yield f"data: {_dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        lease.release()  # a disconnect lands here too (as a cancellation)


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 413))
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    st = _state(request)
    model, rt = await _load(request, body.model)
    if body.messages is not None:
        ids = await _in_thread(st, model, chat_prompt, model, rt, body.messages, body.add_generation_prompt)
    elif body.prompt is not None:
        text = check_text(body.prompt, "prompt")
        ids = await _in_thread(
            st, model, lambda: rt.tokenize(text, add_bos=body.add_special_tokens, special=True)
        )
    else:
        raise BadRequest("give prompt (or content) or messages", "prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": context_length(model, rt, st.n_ctx)}


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404, 413))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    st = _state(request)
    model, rt = await _load(request, body.model)
    bad = [t for t in body.tokens if t >= rt.n_vocab]
    if bad:
        raise BadRequest(f"token {bad[0]} is outside the vocabulary (0..{rt.n_vocab - 1})", "tokens")
    return {"prompt": await _in_thread(st, model, rt.detokenize, list(body.tokens))}
