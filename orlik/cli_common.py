"""What every `orlik` verb shares: printing a result, defaults read from the stages, and refusing a
stage that is not built."""

from __future__ import annotations

import importlib
import json
from typing import Any, NoReturn

import click

from orlik import __version__
from orlik.errors import NotBuiltError


def not_built(verb: str, issue: str) -> NoReturn:
    raise NotBuiltError(f"`orlik {verb}` is not built yet in orlik {__version__} ({issue})")


class Constant:
    """A click default that is a stage module's constant, read when first needed (a verb's --help or
    run), so the option never repeats the value and `orlik --help` imports no stage:
    `@click.option("--kmax", type=int, default=Constant("orlik.benchmarks.reference", "KMAX"))`."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)

    def __str__(self) -> str:  # what --help shows as the default
        return str(self())


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


def runs_once(path: Any) -> dict[str, Any]:
    """Load the variant directory `path` in its format's runtime and run one forward pass: the last
    check before `orlik quantize` keeps a variant (quantize itself never imports serving)."""
    import time

    import numpy as np

    from orlik.errors import ToolError
    from orlik.serving.runtimes.base import load_runtime

    t0 = time.perf_counter()
    rt = load_runtime(path)
    try:
        tokens = rt.tokenize("Kraków leży nad Wisłą. The river flows north.")[:16]
        logits = rt.logits(tokens)
        n_vocab = rt.n_vocab
    finally:
        rt.close()
    if logits.shape != (len(tokens), n_vocab) or not np.isfinite(logits).all():
        raise ToolError(f"{rt.name} gave logits of shape {logits.shape} with non-finite values or wrong size")
    return {"runtime": rt.name, "tokens": len(tokens), "seconds": round(time.perf_counter() - t0, 2)}
