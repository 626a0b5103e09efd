"""A generation read on the event loop (Runtime.stream, e.g. llama-server's): engine.Run's twin
with no worker thread.

engine.Run hands each token from a worker thread to the loop (a self-pipe write, a wake-up and a
future per token); here the request parses what its runtime's socket has received when it is ready
to send the next chunk, so a burst of tokens costs one wake-up: with --stream-interval and a model
faster than it, one timer per chunk.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

from orlik.serving.engine import Emitter, Event, GenRequest, RequestTimeout, merge
from orlik.serving.runtimes.base import Runtime, TokenStream


class _Cancel:
    """run.cancel as engine.Run has it (set() / is_set()); setting it closes the stream at once."""

    def __init__(self, run: StreamRun) -> None:
        self._run, self._set = run, False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._run.end_soon()

    def is_set(self) -> bool:
        return self._set


class StreamRun:
    """One scheduled generation whose tokens the event loop reads itself; same interface as Run."""

    def __init__(self, runtime: Runtime, req: GenRequest, stream: TokenStream, deadline: float,
                 timeout: float, on_end: Callable[[], None]) -> None:  # fmt: skip
        self.loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self.stream, self.deadline, self.timeout = stream, deadline, timeout
        self.emitter = Emitter(runtime, req)
        self.cancel = _Cancel(self)
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self._ready: deque[Event] = deque()
        self._error: BaseException | None = None
        self._over = False  # no more events will come (the last is queued, or it failed)
        self._last_sent = 0.0
        self._sleep_first = False  # see next_merged
        # A stop string is found only when a chunk is parsed: with stop strings, each token is
        # parsed as it comes (and the finish goes out at once), as on the worker thread.
        self._may_sleep_first = not req.stop
        self._on_end: Callable[[], None] | None = on_end  # frees the slot, once
        self._expired = False
        self._timer = self.loop.call_later(max(deadline - time.monotonic(), 0.001), self._expire)

    def _expire(self) -> None:
        self._expired = True
        self.stream.close()

    def end(self) -> None:
        """The generation is over (or abandoned): close the stream, free the slot; idempotent."""
        self._over = True
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            self._timer.cancel()
            self.stream.close()
            on_end()

    def end_soon(self) -> None:
        if threading.get_ident() == self._thread:
            self.end()
        else:  # a lease dropped by the garbage collector in another thread
            self.loop.call_soon_threadsafe(self.end)

    def _pull(self) -> None:
        """Events from what the stream has received so far (never waits)."""
        if self._over:
            return
        em = self.emitter
        try:
            for tok in self.stream.take():
                ev = em.push(tok)
                if ev is not None:
                    self._ready.append(ev)
                if em.done or em.ended:
                    break
            if not em.done and (em.ended or self.stream.ended):
                self._ready.append(em.finish())
        except Exception as e:  # sent after the events before it, as engine.Run does
            self._error = e
            self.end()
        if em.done:
            self.end()

    async def _fill(self) -> bool:
        """Until an event is ready (True), or the generation is over with nothing left (False)."""
        while True:
            self._pull()
            if self._ready:
                return True
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self._over or self.cancel.is_set():
                return False
            if self._expired or time.monotonic() >= self.deadline:
                self.end()
                raise RequestTimeout(f"the request ran past the server's {self.timeout:g} s timeout")
            try:
                await self.stream.wait()
            except Exception as e:
                self._error = e
                self.end()

    def _take(self) -> Event:
        evs = list(self._ready)
        self._ready.clear()
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return merge(evs)

    async def next(self) -> Event | None:
        """The events ready now as one (None at the end); raises the runtime's error or RequestTimeout."""
        return self._take() if await self._fill() else None

    async def next_merged(self, interval: float = 0.0) -> Event | None:
        """As Run.next_merged: one chunk at most every `interval` s while tokens come faster.

        While the model is faster than the interval, the interval is slept out first with the
        tokens that arrive meanwhile left in the socket's buffer (one wake-up per chunk; the
        stream's end cuts the sleep short); while it is slower, each token is waited for (no
        timer that finds nothing). Each chunk's outcome chooses the next one's order.
        """
        if interval > 0 and self._sleep_first and not self._over:
            wait = self._last_sent + interval - time.monotonic()
            if wait > 0:
                await self.stream.wait(wait)
                self._pull()
                self._sleep_first = bool(self._ready)
        if not await self._fill():
            return None
        if interval > 0 and not self._sleep_first and self._ready[-1].finish_reason is None:
            wait = self._last_sent + interval - time.monotonic()
            if wait > 0:  # a token came within the interval: sleep the rest out, and first next time
                self._sleep_first = self._may_sleep_first
                await self.stream.wait(wait)
                self._pull()
        self._last_sent = time.monotonic()
        return self._take()
