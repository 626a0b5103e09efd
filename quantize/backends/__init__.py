"""Quantization backends, one module per format: `<format>.py` defines `BACKEND` (found by
orlik.registry, by that convention).

A backend turns an FP16 checkpoint into a variant directory; it never runs the result (that is
serving's runtimes). Modules are imported only when their format is used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from orlik import registry
from orlik.checkpoint import Checkpoint
from orlik.errors import MissingDependencyError, UnknownNameError
from orlik.manifest import Variant
from orlik.quantize.recipe import FORMATS, Recipe


@dataclass(frozen=True)
class Calibration:
    """What a backend may read from the calibration stage; any part can be absent."""

    jsonl: Path | None = None  # calibration.jsonl from `orlik calibrate build`
    imatrix: Path | None = None  # imatrix.gguf from `orlik calibrate imatrix`
    hash: str | None = None  # content hash of calibration.jsonl (from its card)
    imatrix_hash: str | None = None


class Backend(ABC):
    name: str = ""
    formats: tuple[str, ...] = ()
    # Recipe options this backend reads, with their types; `orlik quantize --option KEY=VALUE`
    # sets them (checked against this table) and they are recorded in variant.json.
    options: dict[str, type] = {}

    @classmethod
    def options_for(cls, recipe: Recipe) -> dict[str, type]:
        """The options `recipe` reads (all of the backend's unless a backend narrows it)."""
        return cls.options

    @classmethod
    def missing(cls) -> str | None:
        """Why this backend cannot run here, with the exact install line; None when it can."""
        return None

    def check(self, recipe: Recipe, calib: Calibration) -> None:
        """Raise an InputError for a recipe this backend will refuse, before any slow work starts."""
        return None

    def prepare(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration) -> None:
        """Checks that need the checkpoint (shapes, an imatrix's fit), run for every recipe before
        the first variant is built, so that a bad input fails the run before any output."""
        return None

    def close(self) -> None:
        """Stop any work `prepare` started ahead that no build took up (run after the last build)."""
        return None

    def stale(self, variant: Variant, recipe: Recipe) -> str | None:
        """Why an existing, verified variant of `recipe` is not what this backend builds now (e.g. it
        came from an older method), or None; checked after the manifest, recipe and inputs match."""
        return None

    @abstractmethod
    def quantize(self, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Variant:
        """Write the variant's files into `out` (an empty staging dir) and return its manifest.

        The caller owns atomicity: it passes a `.partial` directory and renames it when the
        returned Variant has been saved.
        """


def backend_class(fmt: str) -> type[Backend]:
    """The backend class for `fmt`; its module imports no quantization library."""
    try:
        cls: type[Backend] = registry.backend_class(fmt)
    except UnknownNameError:
        if fmt in FORMATS:  # a format recipes may name, whose backend this build lacks
            raise MissingDependencyError(f"the {fmt} backend is not part of this orlik build yet") from None
        raise
    return cls


def backend_for(fmt: str) -> Backend:
    cls = backend_class(fmt)
    why = cls.missing()
    if why:
        raise MissingDependencyError(why)
    return cls()
