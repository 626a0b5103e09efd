"""Every failure as an HTTP status and OpenAI's error shape: client mistakes are 4xx, never 5xx."""

from __future__ import annotations

import json
import logging
from typing import Any

from orlik.errors import InputError, MissingDependencyError, OrlikError, ToolError

log = logging.getLogger("orlik.serving")


def body(
    message: str, type_: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or status}}


def for_exception(exc: BaseException, retry_after: int = 1) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) for an exception raised while serving a request."""
    from orlik.serving.engine import QueueFull, RequestTimeout
    from orlik.serving.faults import BackendDied, BackendStalled, ClientGone
    from orlik.serving.models import ModelNotFound, ServerBusy

    msg = str(exc) or type(exc).__name__
    if isinstance(exc, BackendDied):  # restarting: worth a retry once the model is back
        log.error("request failed: %s", msg)
        status = 504 if isinstance(exc, BackendStalled) else 503
        code = "backend_stalled" if status == 504 else "backend_died"
        return (
            status,
            body(msg, "server_error", status, None, code),
            {"Retry-After": str(max(2, retry_after))},
        )
    if isinstance(exc, ClientGone):
        return 499, body(msg, "invalid_request_error", 499, None, "client_closed_request"), {}
    if isinstance(exc, ModelNotFound):
        return 404, body(msg, "invalid_request_error", 404, "model", "model_not_found"), {}
    if isinstance(exc, QueueFull):
        return 429, body(msg, "rate_limit_error", 429, None, "queue_full"), {"Retry-After": str(retry_after)}
    if isinstance(exc, ServerBusy):
        return 503, body(msg, "server_busy", 503), {"Retry-After": str(retry_after)}
    if isinstance(exc, RequestTimeout):
        return 504, body(msg, "timeout_error", 504, None, "timeout"), {}
    if isinstance(exc, InputError):
        return 400, body(msg, "invalid_request_error", 400, getattr(exc, "param", None)), {}
    if isinstance(exc, (MissingDependencyError, ToolError, OrlikError)):
        log.error("request failed: %s", msg)
        return 500, body(msg, "server_error", 500), {}
    log.exception("unexpected error while serving a request", exc_info=exc)
    return 500, body(f"internal error: {type(exc).__name__}: {msg}", "server_error", 500), {}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line from pydantic's errors, naming the parameter (OpenAI puts it in `param`)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    # pydantic reports each member of a union; drop the type tags so the path reads like the JSON.
    loc = [
        p
        for p in loc
        if not (p.startswith(("list[", "str", "int", "function-")) or p in {"json-or-python", "TokenId"})
    ]
    param = ".".join(loc) or None
    if e.get("type") == "model_attributes_type" and not loc:
        return "the request body must be a JSON object, sent with 'Content-Type: application/json'", None
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if param == "n":
        return "n must be 1: orlik returns one choice per request", "n"
    if param == "best_of":
        return "best_of must be 1", "best_of"
    if e.get("type") == "missing":
        return f"missing required parameter {param!r}", param
    text = e.get("msg", "invalid value")
    shown = json.dumps(e.get("input"), ensure_ascii=False, default=str)[:80] if "input" in e else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {text}" + (f", got {shown}" if shown else "") + more, param
