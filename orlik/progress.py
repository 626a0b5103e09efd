"""Progress bars and console output that respect --quiet and --json."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_state = {"quiet": False, "json": False}


def configure(*, quiet: bool = False, json_mode: bool = False) -> None:
    _state["quiet"] = quiet or json_mode
    _state["json"] = json_mode


def quiet() -> bool:
    return _state["quiet"] or bool(os.environ.get("ORLIK_QUIET"))


def console() -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet())


def info(msg: str) -> None:
    if not quiet():
        console().print(msg, highlight=False)


def warn(msg: str) -> None:
    """Something the user should act on or know: on stderr even with --quiet, which drops chatter only."""
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]warning:[/] {msg}", highlight=False)


@contextmanager
def bar(description: str, total: float | None, **fields: Any) -> Iterator[Any]:
    """A rich progress bar; `fields` become extra columns (e.g. loss, tok/s) updated by the caller."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{k}={{task.fields[{k}]}}") for k in fields]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    disable = quiet() or (not sys.stderr.isatty() and bool(os.environ.get("CI")))
    with Progress(*columns, console=console(), disable=disable, transient=False) as p:
        task = p.add_task(description, total=total, **fields)

        class _Handle:
            def advance(self, n: float = 1, **upd: Any) -> None:
                p.update(task, advance=n, **upd)

            def update(self, **upd: Any) -> None:
                p.update(task, **upd)

        yield _Handle()
