"""The FastAPI application: middleware (auth, body limit, CORS, metrics), errors, health, web page.

Security defaults: an API key (when set) guards everything but /health, /openapi.json and the web
page's static files; request bodies are capped; CORS is off unless origins are named.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from orlik import __version__
from orlik.errors import OrlikError
from orlik.serving import faults, http_errors, scoring
from orlik.serving.api import ServerState, router
from orlik.serving.engine import Scheduler
from orlik.serving.metrics import Metrics
from orlik.serving.models import ModelRegistry

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
OPEN_PATHS = {"/", "/health", "/openapi.json", "/favicon.ico"}
WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}


async def _send_json(send: Callable[[Any], Awaitable[None]], status: int, payload: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:  # fmt: skip
    import json

    data = json.dumps(payload).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """API key and body-size limit, as one pure ASGI layer so streaming responses pass untouched."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.key, self.max_body = app, api_key, max_body

    def _authorized(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if not self.key or path in OPEN_PATHS or path.startswith("/web/") or scope.get("method") == "OPTIONS":
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = (
            auth[7:].strip()
            if auth[:7].lower() == "bearer "
            else headers.get(b"x-api-key", b"").decode("latin-1")
        )
        return hmac.compare_digest(given.encode(), self.key.encode())

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            msg = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
            return await _send_json(send, 401, http_errors.body(msg, "authentication_error", 401, None, "invalid_api_key"),
                                    {"WWW-Authenticate": "Bearer"})  # fmt: skip
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = http_errors.body(f"request body is larger than the server's limit of {self.max_body} bytes",
                                   "invalid_request_error", 413, None, "body_too_large")  # fmt: skip
        if length is not None:
            if not length.isdigit():
                return await _send_json(
                    send, 400, http_errors.body("bad Content-Length", "invalid_request_error", 400)
                )
            if int(length) > self.max_body:
                return await _send_json(send, 413, too_big)
        # Buffer the (bounded) body, then replay it; later receives (disconnects) pass through.
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_json(send, 413, too_big)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_again() -> Any:
            return replay.pop() if replay else await receive()

        return await self.app(scope, receive_again, send)


class Observe:
    """Request counts and latency per endpoint, model and status, for /metrics."""

    ENDPOINTS = (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
    )

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), [500]

        async def send_(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            endpoint = (
                path
                if path in self.ENDPOINTS
                else ("/v1/models" if path.startswith("/v1/models/") else "other")
            )
            state = scope.get("state") or {}
            lease = state.get("lease")
            if lease is not None:  # the request's claim on its model ends with its response
                lease.release()
            model = str(state.get("model", ""))
            self.metrics.request(endpoint, model, int(state.get("stream_error", status[0])))
            if model and endpoint in ("/v1/chat/completions", "/v1/completions") and status[0] == 200:
                self.metrics.timing(model, time.monotonic() - t0, state.get("ttft"))


def create_app(registry: ModelRegistry, *, api_key: str | None = None, cors: list[str] | None = None,
               max_body: int = 4 << 20, queue_size: int = 8, timeout: float = 120.0, n_ctx: int | None = None,
               stream_interval: float = 0.0) -> FastAPI:  # fmt: skip
    metrics = Metrics()
    scheduler = Scheduler(queue_size, timeout, workers=registry.parallel * len(registry.models) + 2,
                          stream_interval=stream_interval)  # fmt: skip
    state = ServerState(registry, scheduler, metrics, n_ctx)
    metrics.gauge("orlik_queue_depth", lambda: {(): scheduler.waiting})
    metrics.gauge("orlik_requests_running", lambda: {(): scheduler.running})
    metrics.gauge("orlik_model_loaded", lambda: {(("model", m.name),): float(m.runtime is not None)
                                                 for m in registry.models.values()})  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        async with faults.watching(registry):  # restarts a model whose runtime died
            yield
        scheduler.close()
        registry.close()  # stops llama-server children

    app = FastAPI(title="orlik", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible serving of orlik variants (GGUF through llama-server, FP16 through transformers).")  # fmt: skip
    app.state.orlik = state
    app.include_router(router)
    app.include_router(scoring.router)  # /tokenizer_info, for lm-eval's remote tokenizer
    _publish_model_names(app, registry.names())

    _add_error_handlers(app, scheduler)
    _add_pages(app, registry, scheduler, metrics)

    # Starlette runs the last added outermost: CORS, then metrics, then the key and body checks.
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    app.add_middleware(Observe, metrics=metrics)
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key"])  # fmt: skip
    return app


def _add_error_handlers(app: FastAPI, scheduler: Scheduler) -> None:
    """Every error as OpenAI's error object: validation 400, Starlette's own, and OrlikError."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = http_errors.validation_message(list(exc.errors()))
        return JSONResponse(http_errors.body(msg, "invalid_request_error", 400, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(http_errors.body(str(exc.detail), kind, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        status, payload, headers = http_errors.for_exception(exc, scheduler.retry_after())
        return JSONResponse(payload, status_code=status, headers=headers)

    # OrlikError (4xx and known 5xx) is answered inside; anything else reaches Starlette's last-resort
    # handler, which also logs the traceback.
    app.add_exception_handler(OrlikError, _mapped)
    app.add_exception_handler(Exception, _mapped)


def _add_pages(app: FastAPI, registry: ModelRegistry, scheduler: Scheduler, metrics: Metrics) -> None:
    """/health, /metrics and the web chat page."""

    @app.get(
        "/health", responses={503: {"description": "a loaded model's runtime has died or is restarting"}}
    )
    async def health() -> JSONResponse:
        models = {m.name: m.state for m in registry.models.values()}
        dead = [m.name for m in registry.models.values()
                if m.restarting or (m.runtime is not None and not m.runtime.alive())]  # fmt: skip
        body = {"status": "error" if dead else "ok", "models": models, "running": scheduler.running,
                "queued": scheduler.waiting}  # fmt: skip
        return JSONResponse(body, status_code=503 if dead else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _web_file("index.html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web(name: str) -> Response:
        return _web_file(name)


def _publish_model_names(app: FastAPI, names: list[str]) -> None:
    """The OpenAPI document lists the served model ids, so generated clients and fuzzers know them."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            for props in (
                s.get("properties", {}) for s in schema.get("components", {}).get("schemas", {}).values()
            ):
                m = props.get("model")
                if m is None:
                    continue
                if m.get("type") == "string":
                    m["enum"] = list(names)
                elif "anyOf" in m:
                    m["anyOf"] = [{"type": "string", "enum": list(names)}, {"type": "null"}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _web_file(name: str) -> Response:
    if name not in WEB_FILES:
        return JSONResponse(
            http_errors.body(f"no such file: {name}", "not_found_error", 404), status_code=404
        )
    data = resources.files("orlik.serving.web").joinpath(name).read_bytes()
    return Response(data, media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})
