"""The one format -> backend / runtime lookup, by convention (as mlx-lm's `_get_classes`).

A format's backend is `orlik.quantize.backends.<format>` (its `BACKEND`), and its runtime is
`orlik.serving.runtimes.<format>` (its `RUNTIME`) unless RUNTIME_REMAP names the module that runs
it. A new format is a new module, not an edit here. Modules are imported only when their format is
used, so no quantization or inference library loads before it is needed.

The one place where serving and evaluation run a format differently is SERVE_REMAP: `orlik serve`
runs GGUF in a managed llama-server, whose continuous batch overlaps concurrent requests, while
`orlik bench` and `orlik chat` run it in-process through llama-cpp-python, which returns the
full-vocabulary logits the evaluator needs in one call. Both are the same llama.cpp build on the
same .gguf file.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any

from orlik.errors import UnknownNameError

BACKENDS = "orlik.quantize.backends"
RUNTIMES = "orlik.serving.runtimes"

# Runtime modules whose name is not their format's (one module may run several formats).
RUNTIME_REMAP: dict[str, str] = {"fp16": "hf", "gguf": "llamacpp", "gptq": "hfquant", "awq": "hfquant"}
# What `orlik serve` runs instead of RUNTIME_REMAP's choice (see the module docstring).
SERVE_REMAP: dict[str, str] = {"gguf": "llamaserver"}


def backend_class(fmt: str) -> Any:
    """The Backend class that writes `fmt`; UnknownNameError (listing the valid ones) if none does."""
    return _find(BACKENDS, fmt, fmt, "BACKEND")


def runtime_class(fmt: str, *, serving: bool = False) -> Any:
    """The Runtime class that runs `fmt`: the server's choice with serving=True, else the evaluator's."""
    module = (SERVE_REMAP.get(fmt) if serving else None) or RUNTIME_REMAP.get(fmt, fmt)
    return _find(RUNTIMES, fmt, module, "RUNTIME")


def formats(package: str, attr: str) -> list[str]:
    """Every format some module of `package` declares in its `attr` class (imports them all: for
    error messages and listings, not for lookups)."""
    pkg = importlib.import_module(package)
    found: set[str] = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        obj = getattr(importlib.import_module(f"{package}.{info.name}"), attr, None)
        found.update(getattr(obj, "formats", ()))
    return sorted(found)


def _find(package: str, fmt: str, module: str, attr: str) -> Any:
    obj = None
    if re.fullmatch(r"[a-z][a-z0-9_]*", module):
        try:
            obj = getattr(importlib.import_module(f"{package}.{module}"), attr, None)
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{module}":
                raise  # the module exists but one of its own imports is missing
    if obj is None or fmt not in getattr(obj, "formats", ()):
        raise UnknownNameError("format", fmt, formats(package, attr))
    return obj
