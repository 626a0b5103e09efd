"""`orlik serve` and `orlik chat`: the serving verbs and the runtime options they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from orlik.cli_common import Constant

_SERVER, _CHAT = "orlik.serving.server", "orlik.serving.chat"  # whose constants are the defaults


def _runtime_options(f: Any) -> Any:
    """Options `orlik serve` and `orlik chat` share."""
    for opt in reversed([
        click.option("--parallel", type=int, default=Constant(_SERVER, "PARALLEL"), show_default=True, help="Concurrent generations (slots) per model."),
        click.option("--threads", default=None, type=int, help="CPU threads per model (default: all cores)."),
        click.option("--ctx-size", default=None, type=int, help="Context per request in tokens (default: the model's)."),
        click.option("--chat-template", type=click.Path(path_type=Path), default=None,
                     help="Override the model's chat template (.jinja file or tokenizer_config.json)."),
    ]):  # fmt: skip
        f = opt(f)
    return f


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--host", default=Constant(_SERVER, "HOST"), show_default=True, help="Bind address (loopback by default)."
)
@click.option("--port", type=int, default=Constant(_SERVER, "PORT"), show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' [env: ORLIK_API_KEY].")
@click.option(
    "--queue-size",
    type=int,
    default=Constant(_SERVER, "QUEUE_SIZE"),
    show_default=True,
    help="Requests that may wait for a slot; more get 429.",
)
@click.option(
    "--timeout",
    type=float,
    default=Constant(_SERVER, "TIMEOUT"),
    show_default=True,
    help="Seconds a request may take, queueing included.",
)
@click.option("--memory-budget", default=None, help="e.g. 8G: unload idle models to stay under it.")
@click.option("--cors", multiple=True, help="Allow this browser origin (repeatable); CORS is off by default.")
@click.option(
    "--max-body",
    type=int,
    default=Constant(_SERVER, "MAX_BODY"),
    show_default=True,
    help="Largest request body in bytes (413 above).",
)
@click.option("--preload", is_flag=True, help="Load every model at startup instead of at its first request.")
@click.option(
    "--stream-interval",
    "stream_interval_ms",
    type=float,
    default=Constant(_SERVER, "STREAM_INTERVAL_MS"),
    show_default=True,
    help="Send a stream chunk at most every this many ms (tokens in between are merged); 0: every token.",
)
@click.option(
    "--stall-timeout",
    type=float,
    default=Constant("orlik.serving.runtimes.llamaserver_child", "STALL_TIMEOUT"),
    show_default=True,
    help="Seconds a llama-server child may show no sign of life before it is probed; one that "
    "does not answer is killed and restarted, its requests get 504.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check each variant's file sha256s against its manifest at start-up (sizes are always checked).",
)
@_runtime_options
def serve(models: tuple[str, ...], cors: tuple[str, ...], **kw: Any) -> None:
    """OpenAI-compatible server (plus a web chat at /) for MODELS.

    Each MODEL is a variant directory, an FP16 checkpoint or a .gguf file, optionally NAME=PATH.
    GGUF runs through a managed llama-server (real parallel slots); FP16 through transformers.
    """
    from orlik.serving import server

    server.serve(list(models), cors=list(cors) or None, **kw)


@click.command()
@click.argument("model")
@click.option("--system", default=None, help="System prompt.")
@click.option("--temperature", type=float, default=Constant(_CHAT, "TEMPERATURE"), show_default=True)
@click.option("--top-p", type=float, default=Constant(_CHAT, "TOP_P"), show_default=True)
@click.option(
    "--max-tokens", type=int, default=Constant(_CHAT, "MAX_TOKENS"), show_default=True, help="Per reply."
)
@click.option("--seed", default=None, type=int)
@_runtime_options
def chat(model: str, **kw: Any) -> None:
    """Chat with MODEL in the terminal, streaming, with history (/reset, /exit).

    Uses the model's chat template and the same runtimes as `orlik serve`.
    """
    from orlik.serving import chat as chat_mod

    chat_mod.run(model, **kw)
