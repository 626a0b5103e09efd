"""`orlik serve`: build the model registry and the app, then run uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from orlik import progress
from orlik.errors import InputError
from orlik.serving.runtimes.llamaserver_child import STALL_TIMEOUT

log = logging.getLogger("orlik.serving")

# `orlik serve`'s defaults, read by its options in orlik/cli_serve.py (the stall timeout's is
# llamaserver_child.STALL_TIMEOUT).
HOST, PORT = "127.0.0.1", 8080
PARALLEL = 4  # concurrent generations (slots) per model
QUEUE_SIZE = 8  # requests that may wait for a slot; more get 429
TIMEOUT = 120.0  # seconds a request may take, queueing included
MAX_BODY = 4 << 20  # bytes
STREAM_INTERVAL_MS = 10.0  # tokens arriving within this are merged into one stream chunk


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_api_key(key: str | None) -> None:
    """HTTP headers carry bytes that servers read as latin-1 and clients such as httpx and the openai
    client send as ASCII only, so a key outside printable ASCII could never be matched: refused."""
    if key and not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise InputError("the API key must be printable ASCII without spaces (HTTP headers carry no other "
                         "characters reliably); choose another --api-key / ORLIK_API_KEY")  # fmt: skip


def build(models: list[str], *, api_key: str | None = None, queue_size: int = QUEUE_SIZE,
          parallel: int = PARALLEL, timeout: float = TIMEOUT, memory_budget: str | None = None,
          chat_template: Path | None = None, cors: list[str] | None = None, threads: int | None = None,
          ctx_size: int | None = None, max_body: int = MAX_BODY, preload: bool = False,
          stream_interval_ms: float = STREAM_INTERVAL_MS, stall_timeout: float | None = None,
          verify: bool = True) -> Any:  # fmt: skip
    """The ASGI app for `models` (paths, or NAME=PATH); also what the tests and benchmarks serve."""
    from orlik.serving.app import create_app
    from orlik.serving.models import ModelRegistry, parse_bytes

    _check_api_key(api_key)
    if parallel < 1 or queue_size < 0 or timeout <= 0 or max_body < 1024:
        raise InputError("--parallel must be >= 1, --queue-size >= 0, --timeout > 0 and --max-body >= 1024")
    if not 0 <= stream_interval_ms <= 1000:
        raise InputError("--stream-interval must be within 0..1000 ms")
    stall_timeout = STALL_TIMEOUT if stall_timeout is None else stall_timeout
    if not 0.5 <= stall_timeout <= 3600:
        raise InputError("--stall-timeout must be within 0.5..3600 s")
    if ctx_size is not None and ctx_size < 16:
        raise InputError("--ctx-size must be at least 16 tokens")
    budget = parse_bytes(memory_budget) if memory_budget else None
    registry = ModelRegistry(models, parallel=parallel, memory_budget=budget, chat_template=chat_template,
                             threads=threads, n_ctx=ctx_size, stall_timeout=stall_timeout, verify=verify)  # fmt: skip
    try:
        if preload:
            for m in registry.models.values():
                progress.info(f"loading {m.name} ({m.format})")
                registry.load_blocking(m)
        return create_app(registry, api_key=api_key, cors=cors, max_body=max_body, queue_size=queue_size,
                          timeout=timeout, n_ctx=ctx_size, stream_interval=stream_interval_ms / 1000)  # fmt: skip
    except BaseException:
        registry.close()
        raise


def serve(models: list[str], *, host: str = HOST, port: int = PORT, log_level: str = "info",
          **options: Any) -> None:  # fmt: skip
    import uvicorn

    api_key = options.pop("api_key", None) or os.environ.get("ORLIK_API_KEY") or None
    if not _loopback(host) and not api_key:
        progress.info(f"[yellow]warning: listening on {host} without an API key: anyone who can reach "
                      "this port can use the models (set --api-key or ORLIK_API_KEY)[/]")  # fmt: skip
    app = build(models, api_key=api_key, **options)
    names = ", ".join(app.state.orlik.registry.names())
    progress.info(f"orlik serving {names} at http://{host}:{port}/v1 (web chat at http://{host}:{port}/)")
    # timeout_graceful_shutdown: open streams get a moment to finish; the lifespan then stops children.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **uvicorn_impl())


def uvicorn_impl() -> dict[str, str]:
    """uvicorn's C event loop and HTTP parser (uvloop, httptools; pinned in orlik[serve]) where they
    import, else asyncio's loop and h11: the C pair costs less CPU per streamed chunk."""
    import importlib

    impl = {}
    for key, module, fallback in (("loop", "uvloop", "asyncio"), ("http", "httptools", "h11")):
        try:
            importlib.import_module(module)
            impl[key] = module
        except ImportError:
            impl[key] = fallback
    log.info("uvicorn loop=%s http=%s", impl["loop"], impl["http"])
    return impl
