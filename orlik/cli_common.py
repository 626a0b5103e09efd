"""What every `orlik` verb shares: printing a result, and refusing a stage that is not built."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import click

from orlik import __version__
from orlik.errors import NotBuiltError


def not_built(verb: str, issue: str) -> NoReturn:
    raise NotBuiltError(f"`orlik {verb}` is not built yet in orlik {__version__} ({issue})")


def emit(obj: Any, ctx: click.Context | None = None) -> None:
    """Print a result as JSON under --json, else as readable text."""
    ctx = ctx or click.get_current_context()
    if ctx.find_root().obj.get("json"):
        click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    elif isinstance(obj, str):
        click.echo(obj)
    else:
        for k, v in obj.items():
            click.echo(f"{k}: {v}")
