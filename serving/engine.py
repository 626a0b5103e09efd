"""Generation for the server and `orlik chat`: text deltas, stop strings, logprobs, finish reasons.

`events()` is the synchronous core (it runs in a worker thread); `Scheduler` is the asyncio side:
a bounded wait queue, per-model slots, per-request timeouts and cancellation that reaches the
worker, so a client that disconnects frees its slot within a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orlik.errors import OrlikError
from orlik.serving.faults import unless_gone
from orlik.serving.runtimes.base import Runtime, Sampling, Token
from orlik.serving.textstream import IncrementalDetokenizer, StopBuffer

if TYPE_CHECKING:
    from orlik.serving.streamrun import StreamRun


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


Gone = Callable[[], Awaitable[bool]]  # says whether the request's client has disconnected


class QueueFull(OrlikError):
    """Every slot is busy and the wait queue is full (HTTP 429)."""


class RequestTimeout(OrlikError):
    """The request ran past the server's --timeout (HTTP 504)."""


def _piece(runtime: Runtime, tid: int) -> tuple[str, list[int]]:
    b = runtime.token_piece(tid)
    return b.decode("utf-8", errors="replace"), list(b)


class Emitter:
    """One generation's token-to-event logic (detokenization, stop holdback, logprobs, finish),
    fed one token at a time, so a thread (events()) and the event loop (streamrun) share it.

    push() returns the event to send for a token, if any; after it, `done` means the generation is
    over (a stop string: that event was the last), `ended` that the runtime's stream should end and
    finish() gives the final event (EOS or max_tokens). finish() also ends a stream that the
    runtime ended on its own.
    """

    def __init__(self, runtime: Runtime, req: GenRequest) -> None:
        self.runtime, self.req = runtime, req
        self.eos = runtime.eos_ids
        self.detok: IncrementalDetokenizer | None = None
        self.stops = StopBuffer(req.stop)
        self.n, self.pos_in, self.pos_out = 0, 0, 0
        # Logprobs wait with their token's text: (start, end) offsets into the generated text.
        self.held: list[tuple[int, int, TokenLogprob]] = []
        # "stop" when the runtime ends on its own: an EOS it did not yield, or a finished grammar.
        self.finish_reason = "stop"
        self.unsent = ""
        self.done = self.ended = False

    def _release(self, final: bool = False) -> list[TokenLogprob]:
        # Sent once all of the token's text is sent; at the end, every token that showed any text
        # (tokens wholly inside a cut-off stop string go with it).
        pos_out = self.pos_out
        ready = [h for h in self.held if h[1] <= pos_out or (final and h[0] < pos_out)]
        self.held = [] if final else [h for h in self.held if h[1] > pos_out]
        return [lp for _, _, lp in ready]

    def push(self, tok: Token) -> Event | None:
        req, runtime = self.req, self.runtime
        if tok.id in self.eos:
            self.ended = True
            return None
        self.n += 1
        if tok.text is not None:
            text = tok.text
        else:
            if self.detok is None:
                self.detok = IncrementalDetokenizer(runtime.detokenize, req.prompt)
            text = self.detok.push(tok.id)
        start = self.pos_in
        self.pos_in += len(text)
        if req.logprobs is not None:
            s, b = _piece(runtime, tok.id)
            top = [(*_piece(runtime, i), lp) for i, lp in tok.top_logprobs[: req.logprobs]]
            self.held.append((start, self.pos_in, TokenLogprob(s, b, float(tok.logprob or 0.0), top)))
        out = self.stops.push(text)
        self.pos_out += len(out)
        if self.stops.stopped is not None:
            self.done = True
            return Event(out, self._release(final=True), "stop", self.n)
        if self.n >= req.sampling.max_tokens:
            self.finish_reason, self.unsent, self.ended = "length", out, True  # sent with finish()'s event
            return None
        if out or (self.held and self.held[0][1] <= self.pos_out):
            return Event(out, self._release(), None, self.n)
        return None

    def finish(self) -> Event:
        """The last event once the runtime's stream has ended (or push() said `ended`)."""
        stops = self.stops
        tail = stops.push(self.detok.flush() if self.detok is not None else "")
        tail += stops.flush()
        finish = "stop" if stops.stopped is not None else self.finish_reason
        self.pos_out += len(tail)
        if stops.stopped is None:
            self.pos_out = self.pos_in  # everything generated was sent
        self.done = True
        return Event(self.unsent + tail, self._release(final=True), finish, self.n)


def events(runtime: Runtime, req: GenRequest, cancel: threading.Event) -> Iterator[Event]:
    """Run one generation, yielding text that is safe to send; stops early when `cancel` is set."""
    em = Emitter(runtime, req)
    gen = runtime.generate(req.prompt, req.sampling)
    try:
        for tok in gen:
            if cancel.is_set():
                return
            ev = em.push(tok)
            if ev is not None:
                yield ev
            if em.done:
                return
            if em.ended:
                break
        if cancel.is_set():
            return
        yield em.finish()
    finally:
        gen.close()


def merge(evs: list[Event]) -> Event:
    """Several events as one chunk (the finish reason, if any, is on the last)."""
    if len(evs) == 1:
        return evs[0]
    last = evs[-1]
    lps = [lp for e in evs for lp in e.logprobs]
    return Event("".join(e.text for e in evs), lps, last.finish_reason, last.completion_tokens)


class Run:
    """One scheduled generation as seen from the event loop.

    The worker appends to a deque and wakes the loop only when it is not already due to wake, so a
    loop that falls behind a fast model drains many tokens per wake-up instead of one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float, timeout: float) -> None:
        self.loop, self.deadline, self.timeout = loop, deadline, timeout
        self.cancel = threading.Event()
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._signalled = False
        self._ready: deque[Any] = deque()
        self._last_sent = 0.0
        # One bare future per wait and one deadline timer per run (not asyncio.wait_for's task and
        # timer per wait): the wait happens once per token when the model is slower than the loop.
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def put(self, item: Any) -> None:
        """Worker side: an Event, None (done) or the exception that ended the generation."""
        with self._lock:
            self._items.append(item)
            if self._signalled:
                return
            self._signalled = True
        self.loop.call_soon_threadsafe(self._wakeup)

    def _wakeup(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _expire(self) -> None:
        self._expired = True
        self._wakeup()

    async def _fill(self) -> None:
        # No wake-up is lost: the worker signals whenever it appends after the drain below (which
        # resets _signalled under the lock), and the signal runs on this loop after the await.
        while not self._ready:
            with self._lock:
                self._ready.extend(self._items)
                self._items.clear()
                self._signalled = False
            if self._ready:
                break
            if self._expired or time.monotonic() >= self.deadline:
                self.cancel.set()
                raise RequestTimeout(f"the request ran past the server's {self.timeout:g} s timeout")
            if self._timer is None:
                self._timer = self.loop.call_later(max(self.deadline - time.monotonic(), 0.001), self._expire)
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self) -> Event | None:
        item = self._ready.popleft()
        if (item is None or isinstance(item, BaseException)) and self._timer is not None:
            self._timer.cancel()  # the generation has ended
        if isinstance(item, BaseException):
            raise item
        if item is not None and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return item  # type: ignore[no-any-return]

    async def next(self) -> Event | None:
        """The next event, None at the end; raises the worker's error or RequestTimeout."""
        await self._fill()
        return self._take()

    async def next_merged(self, interval: float = 0.0) -> Event | None:
        """All events that are ready, as one (None at the end): one SSE chunk per wake-up.

        With `interval`, a chunk is sent at most that often: a fast model's tokens go out a few at
        a time (fewer writes and fewer chunks for the client to parse), a slow one's as they come.
        """
        await self._fill()
        if interval > 0 and self._ready[-1] is not None and not isinstance(self._ready[-1], BaseException):
            wait = self._last_sent + interval - time.monotonic()
            if wait > 0 and self._ready[-1].finish_reason is None:
                await asyncio.sleep(wait)
                with self._lock:
                    self._ready.extend(self._items)
                    self._items.clear()
                    self._signalled = False
        self._last_sent = time.monotonic()
        evs: list[Event] = []
        while self._ready and not isinstance(self._ready[0], BaseException) and self._ready[0] is not None:
            ev = self._take()
            assert ev is not None
            evs.append(ev)
            if ev.finish_reason is not None:
                break
        if not evs:
            return self._take()
        return merge(evs)


class Scheduler:
    """Admission (bounded queue, 429 when full), slots per model, worker threads, timeouts."""

    def __init__(self, queue_size: int, timeout: float, workers: int, stream_interval: float = 0.0) -> None:
        self.queue_size, self.timeout = int(queue_size), float(timeout)
        self.stream_interval = float(stream_interval)
        self.waiting = 0
        self.running = 0
        self._loading: dict[str, int] = {}  # requests waiting for each model's load
        # Each running generation holds one thread while it streams; slots cap them per model.
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="orlik-gen")

    def retry_after(self) -> int:
        return max(1, min(30, self.waiting))

    def _enqueue(self) -> None:
        if self.waiting >= self.queue_size:
            raise QueueFull(f"server busy: all slots are taken and {self.waiting} requests are queued")
        self.waiting += 1

    async def acquire(self, sem: asyncio.Semaphore, deadline: float, gone: Gone | None = None) -> None:
        """A slot of the model, waiting in the bounded queue if all are busy; a client that leaves
        (`gone`) while it waits gives its place up at once."""
        if not sem.locked():
            await sem.acquire()
            return
        self._enqueue()
        try:
            await asyncio.wait_for(
                unless_gone(sem.acquire(), gone, lambda _: sem.release()),
                timeout=max(deadline - time.monotonic(), 0.001),
            )
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request waited past the server's {self.timeout:g} s timeout") from None
        finally:
            self.waiting -= 1

    @contextlib.contextmanager
    def waiting_for_load(self, model: str, slots: int) -> Iterator[None]:
        """A request that waits for its model to load: the first `slots` of them will take the
        model's slots; the others hold places in the queue, as if waiting for a slot."""
        n = self._loading[model] = self._loading.get(model, 0) + 1
        queued = n > slots
        try:
            if queued:
                self._enqueue()
        except BaseException:
            self._loading[model] -= 1
            raise
        try:
            yield
        finally:
            self._loading[model] -= 1
            if queued:
                self.waiting -= 1

    async def start(self, runtime: Runtime, sem: asyncio.Semaphore, req: GenRequest, deadline: float,
                    gone: Gone | None = None) -> Run | StreamRun:  # fmt: skip
        """Take a slot and start generating: on this loop if the runtime offers a stream, else in a
        worker thread; the slot frees when the generation ends."""
        await self.acquire(sem, deadline, gone)
        self.running += 1

        def done() -> None:
            self.running -= 1
            sem.release()

        try:
            stream = runtime.stream(req.prompt, req.sampling)
        except BaseException:
            done()
            raise
        if stream is not None:  # read on this loop: no worker thread (serving/streamrun.py)
            from orlik.serving.streamrun import StreamRun

            srun = StreamRun(runtime, req, stream, deadline, self.timeout, done)
            try:
                await stream.start()
            except BaseException:
                srun.end()
                raise
            return srun
        loop = asyncio.get_running_loop()
        run = Run(loop, deadline, self.timeout)

        def work() -> None:
            try:
                for ev in events(runtime, req, run.cancel):
                    run.put(ev)
                run.put(None)
            except BaseException as e:  # handed to the request, which maps it to an HTTP error
                run.put(e)
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
