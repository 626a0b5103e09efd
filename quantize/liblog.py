"""Library chatter to a file: what GPTQModel and tokenicer print (INFO lines, offload paths, kernel
builds, their own progress bars) and the log records and warnings of the libraries they call go to a
per-variant log file named in orlik's output, so the terminal keeps orlik's bars and results."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


@contextlib.contextmanager
def library_log(path: Path) -> Iterator[Path]:
    """Within the block, stdout (logbar, print) and every logging handler that writes to the terminal
    write to `path` (appended); orlik's own output is on stderr through rich and stays there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), warnings.catch_warnings():
        warnings.showwarning = _to(f)
        moved = _point_handlers_at(f)
        root = logging.getLogger()
        catch = logging.StreamHandler(f)  # records of loggers that get their handlers inside the block
        catch.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(catch)
        try:
            yield path
        finally:
            root.removeHandler(catch)
            for handler, old in moved:
                handler.setStream(old)


def _point_handlers_at(f: TextIO) -> list[tuple[logging.StreamHandler[Any], Any]]:
    loggers = [
        logging.getLogger(),
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    moved = []
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and h.stream in (
                sys.stdout,
                sys.stderr,
                sys.__stdout__,
                sys.__stderr__,
            ):
                moved.append((h, h.setStream(f)))
    return moved


def _to(f: TextIO) -> Any:
    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        f.write(warnings.formatwarning(message, category, filename, lineno, line))

    return show
