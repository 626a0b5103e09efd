"""What the server does when a runtime fails or a client leaves: the errors, the restart, the waits.

A llama-server child that dies or hangs fails its requests with 503 (died) or 504 (hung), both
with Retry-After; the watch below restarts it without waiting for the next request, and /health
says "restarting" meanwhile. A client that leaves while it waits for a load or a slot gives its
place up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from orlik.errors import OrlikError, ToolError

if TYPE_CHECKING:
    from orlik.serving.models import ModelRegistry, ServedModel

log = logging.getLogger("orlik.serving")
T = TypeVar("T")
# How often a waiting request looks for its client, and the watch for dead runtimes.
POLL_S = 0.25


class BackendDied(ToolError):
    """The model's runtime process ended mid-request; it is being restarted (HTTP 503, Retry-After)."""


class BackendStalled(BackendDied):
    """The model's runtime stopped responding and was killed; it is being restarted (HTTP 504)."""


class ClientGone(OrlikError):
    """The client disconnected while its request waited; nobody reads the answer (HTTP 499)."""


async def unless_gone(aw: Awaitable[T], gone: Callable[[], Awaitable[bool]] | None,
                      undo: Callable[[T], Any] | None = None) -> T:  # fmt: skip
    """Await `aw`, giving up with ClientGone as soon as `gone()` says the client has left; `undo`
    gives back what `aw` got if it finished just as the client left (a slot, say)."""
    task = asyncio.ensure_future(aw)
    if gone is None:
        return await task
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await gone():
                raise ClientGone("the client disconnected while its request was waiting")
    except BaseException:
        if task.done() and not task.cancelled() and task.exception() is None and undo is not None:
            undo(task.result())
        task.cancel()
        raise


async def _restart(registry: ModelRegistry, model: ServedModel) -> None:
    model.restarting = True
    try:
        await registry.ensure_loaded(model)
        log.warning("restarted %s after its runtime failed", model.name)
    except Exception as e:  # the next request reports it (and tries again)
        log.error("could not restart %s: %s", model.name, e)
    finally:
        model.restarting = False


async def watch_runtimes(registry: ModelRegistry, interval: float = POLL_S) -> None:
    """Restart a loaded model whose runtime died (a crashed or hung llama-server) without waiting
    for a request; runs for the server's lifetime."""
    tasks: set[asyncio.Task[Any]] = set()
    while True:
        await asyncio.sleep(interval)
        for m in list(registry.models.values()):
            rt = m.runtime
            if rt is not None and not m.restarting and not rt.alive():
                m.restarting = True  # at once, so /health never reads "ok" in between
                t = asyncio.ensure_future(_restart(registry, m))
                tasks.add(t)
                t.add_done_callback(tasks.discard)


@contextlib.asynccontextmanager
async def watching(registry: ModelRegistry) -> Any:
    task = asyncio.ensure_future(watch_runtimes(registry))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
