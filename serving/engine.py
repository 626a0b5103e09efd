"""Generation for the server and `orlik chat`: text deltas, stop strings, logprobs, finish reasons.

`events()` is the synchronous core (it runs in a worker thread); `Scheduler` is the asyncio side:
a bounded wait queue, per-model slots, per-request timeouts and cancellation that reaches the
worker, so a client that disconnects frees its slot within a token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orlik.serving.runtimes.base import Runtime, Sampling
from orlik.serving.textstream import IncrementalDetokenizer, StopBuffer

from orlik.errors import OrlikError


@dataclass
class GenRequest:
    prompt: list[int]
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; 0: the chosen token's only; k: plus k alternatives


@dataclass
class TokenLogprob:
    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]] = field(default_factory=list)


@dataclass
class Event:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last event
    completion_tokens: int = 0


class QueueFull(OrlikError):
    """Every slot is busy and the wait queue is full (HTTP 429)."""


class RequestTimeout(OrlikError):
    """The request ran past the server's --timeout (HTTP 504)."""


def _piece(runtime: Runtime, tid: int) -> tuple[str, list[int]]:
    b = runtime.token_piece(tid)
    return b.decode("utf-8", errors="replace"), list(b)


def events(runtime: Runtime, req: GenRequest, cancel: threading.Event) -> Iterator[Event]:
    """Run one generation, yielding text that is safe to send; stops early when `cancel` is set."""
    eos = runtime.eos_ids
    detok: IncrementalDetokenizer | None = None
    stops = StopBuffer(req.stop)
    n, pos_in, pos_out = 0, 0, 0
    # Logprobs wait with their token's text: (start, end) offsets into the generated text.
    held: list[tuple[int, int, TokenLogprob]] = []
    gen = runtime.generate(req.prompt, req.sampling)
    finish = "stop"  # the runtime ended on its own: an EOS it did not yield, or a finished grammar
    unsent = ""

    def release(final: bool = False) -> list[TokenLogprob]:
        nonlocal held
        # Sent once all of the token's text is sent; at the end, every token that showed any text
        # (tokens wholly inside a cut-off stop string go with it).
        ready = [h for h in held if h[1] <= pos_out or (final and h[0] < pos_out)]
        held = [] if final else [h for h in held if h[1] > pos_out]
        return [lp for _, _, lp in ready]

    try:
        for tok in gen:
            if cancel.is_set():
                return
            if tok.id in eos:
                break
            n += 1
            if tok.text is not None:
                text = tok.text
            else:
                if detok is None:
                    detok = IncrementalDetokenizer(runtime.detokenize, req.prompt)
                text = detok.push(tok.id)
            start, pos_in = pos_in, pos_in + len(text)
            if req.logprobs is not None:
                s, b = _piece(runtime, tok.id)
                top = [(*_piece(runtime, i), lp) for i, lp in tok.top_logprobs[: req.logprobs]]
                held.append((start, pos_in, TokenLogprob(s, b, float(tok.logprob or 0.0), top)))
            out = stops.push(text)
            pos_out += len(out)
            if stops.stopped is not None:
                yield Event(out, release(final=True), "stop", n)
                return
            if n >= req.sampling.max_tokens:
                finish, unsent = "length", out  # sent with the final event below
                break
            if out or (held and held[0][1] <= pos_out):
                yield Event(out, release(), None, n)
        if cancel.is_set():
            return
        tail = stops.push(detok.flush() if detok is not None else "")
        tail += stops.flush()
        if stops.stopped is not None:
            finish = "stop"
        pos_out += len(tail)
        if stops.stopped is None:
            pos_out = pos_in  # everything generated was sent
        yield Event(unsent + tail, release(final=True), finish, n)
    finally:
        gen.close()


@dataclass
class Run:
    """One scheduled generation as seen from the event loop."""

    queue: asyncio.Queue[Any]
    cancel: threading.Event
    deadline: float
    timeout: float
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    async def next(self) -> Event | None:
        """The next event, None at the end; raises the worker's error or RequestTimeout."""
        left = self.deadline - time.monotonic()
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout=max(left, 0.001))
        except asyncio.TimeoutError:
            self.cancel.set()
            raise RequestTimeout(f"the request ran past the server's {self.timeout:g} s timeout") from None
        if isinstance(item, BaseException):
            raise item
        if item is not None and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return item

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (ev := await self.next()) is not None:
            yield ev


_DONE = None


class Scheduler:
    """Admission (bounded queue, 429 when full), slots per model, worker threads, timeouts."""

    def __init__(self, queue_size: int, timeout: float, workers: int) -> None:
        self.queue_size, self.timeout = int(queue_size), float(timeout)
        self.waiting = 0
        self.running = 0
        # Each running generation holds one thread while it streams; slots cap them per model.
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="orlik-gen")

    def retry_after(self) -> int:
        return max(1, min(30, self.waiting))

    async def acquire(self, sem: asyncio.Semaphore, deadline: float) -> None:
        """A slot of the model, waiting in the bounded queue if all are busy."""
        if sem.locked():
            if self.waiting >= self.queue_size:
                raise QueueFull(f"server busy: all slots are taken and {self.waiting} requests are queued")
            self.waiting += 1
            try:
                await asyncio.wait_for(sem.acquire(), timeout=max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"the request waited past the server's {self.timeout:g} s timeout"
                ) from None
            finally:
                self.waiting -= 1
        else:
            await sem.acquire()

    async def start(self, runtime: Runtime, sem: asyncio.Semaphore, req: GenRequest, deadline: float) -> Run:
        """Take a slot and start generating in a worker thread; the slot frees when the worker ends."""
        await self.acquire(sem, deadline)
        loop = asyncio.get_running_loop()
        run = Run(asyncio.Queue(), threading.Event(), deadline, self.timeout)
        self.running += 1

        def done() -> None:
            self.running -= 1
            sem.release()

        def work() -> None:
            put = run.queue.put_nowait
            try:
                for ev in events(runtime, req, run.cancel):
                    loop.call_soon_threadsafe(put, ev)
                loop.call_soon_threadsafe(put, _DONE)
            except BaseException as e:  # handed to the request, which maps it to an HTTP error
                loop.call_soon_threadsafe(put, e)
            finally:
                loop.call_soon_threadsafe(done)

        try:
            self.pool.submit(work)
        except BaseException:
            done()
            raise
        return run

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
