"""The served models: names, chat templates checked at startup, lazy loading under a memory budget.

Everything that can be known without weights (format, template, size estimate) is resolved when
the server starts, so a bad model fails `orlik serve` at once; weights load on the first request
(or at startup with --preload) and the least recently used idle model is unloaded when another
would not fit in --memory-budget.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orlik import paths
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, OrlikError, UnknownNameError
from orlik.manifest import MANIFEST, Variant
from orlik.serving import templates
from orlik.serving.runtimes.base import Runtime, runtime_class
from orlik.serving.templates import ChatTemplate


class ModelNotFound(OrlikError):
    """The request names a model this server does not serve (HTTP 404)."""


class ServerBusy(OrlikError):
    """The model cannot be loaded now without unloading one that is in use (HTTP 503)."""


def parse_bytes(text: str) -> int:
    """'8G', '512MiB', '2000000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InputError(f"--memory-budget {text!r} is not a size such as 8G or 512M")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


@dataclass
class ServedModel:
    name: str
    path: Path
    format: str
    source: Variant | Checkpoint | Path
    template: ChatTemplate
    est_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))
    runtime: Runtime | None = None
    active: int = 0  # requests holding or waiting for this model
    last_used: float = 0.0
    load_seconds: float | None = None
    restarting: bool = False  # its runtime failed and a fresh one is loading (serving/faults.py)
    _sem: asyncio.Semaphore | None = None
    _load_lock: asyncio.Lock | None = None

    @property
    def state(self) -> str:
        if self.restarting:
            return "restarting"
        return "loaded" if self.runtime is not None else "unloaded"

    def card(self) -> dict[str, Any]:
        info: dict[str, Any] = {"id": self.name, "object": "model", "created": self.created, "owned_by": "orlik",
                                "format": self.format, "state": self.state,
                                "chat_template": self.template.origin}  # fmt: skip
        if self.runtime is not None:
            info["context_length"] = self.runtime.n_ctx
        if isinstance(self.source, Variant):
            info["recipe"] = self.source.recipe
            info["bpw"] = self.source.bpw
        return info


def _open(path: Path, verify: bool = True) -> tuple[str, Variant | Checkpoint | Path]:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if (path / MANIFEST).is_file():
        v = Variant.load(path)
        v.check(hashes=verify)  # as quantize, bench and inspect do: sizes always, sha256 unless --no-verify
        return v.format, v
    if path.is_dir() and not (path / "config.json").is_file() and list(path.glob("*.gguf")):
        raise InputError(f"{path} holds GGUF files but no {MANIFEST}; serve the .gguf file itself")
    return "fp16", Checkpoint.open(path)


def _default_name(path: Path, source: Variant | Checkpoint | Path) -> str:
    if isinstance(source, Variant):
        return source.name
    if isinstance(source, Checkpoint):
        name = paths.model_name(path)
        return f"{name}-fp16" if paths.is_run_layout(path.resolve()) else name
    return path.stem


def _template(fmt: str, path: Path, source: Any, override: Path | None) -> ChatTemplate:
    from orlik.serving.runtimes.llamaserver import gguf_file

    found: ChatTemplate | None = None
    looked: list[str] = []
    base = path if path.is_dir() else path.parent
    if fmt == "gguf":
        gguf = gguf_file(source)
        found = templates.from_gguf(gguf)
        looked.append(f"{gguf.name} metadata")
    if found is None and path.is_dir():
        found = templates.from_hf_dir(base)
        looked.append(f"{base}/chat_template.jinja and tokenizer_config.json")
    if override is not None:
        bos, eos = (found.bos_token, found.eos_token) if found else ("", "")
        return templates.from_file(override, bos, eos)
    if found is None:
        raise InputError(f"{path} has no chat template (looked in {'; '.join(looked)}); "
                         "pass --chat-template FILE to choose one explicitly")  # fmt: skip
    found.check()
    return found


def _estimate(fmt: str, source: Any, parallel: int, n_ctx: int | None) -> int:
    """Resident bytes once loaded: what the memory budget is checked against."""
    if fmt == "gguf":
        from orlik.gguf_read import GGUFMeta
        from orlik.serving.runtimes.llamaserver import gguf_file

        f = gguf_file(source)
        meta = GGUFMeta.read(f)
        ctx = n_ctx or meta.n_ctx_train or 4096
        return f.stat().st_size + meta.kv_bytes_per_token * ctx * parallel + (64 << 20)
    if isinstance(source, Checkpoint):
        return source.weights_bytes * 2 + (128 << 20)  # fp16 weights computed in fp32
    return int(source.bytes) * 2 if isinstance(source, Variant) else 0


def _quiet_libraries() -> None:
    """No transformers progress bars in a server log or between chat turns."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class ModelRegistry:
    def __init__(self, specs: list[str], *, parallel: int = 4, memory_budget: int | None = None,
                 chat_template: Path | None = None, threads: int | None = None, n_ctx: int | None = None,
                 stall_timeout: float | None = None, verify: bool = True) -> None:  # fmt: skip
        if not specs:
            raise InputError(
                "give at least one model (a variant directory, an FP16 checkpoint or a .gguf file)"
            )
        self.parallel, self.budget, self.threads, self.n_ctx = int(parallel), memory_budget, threads, n_ctx
        self.stall_timeout = stall_timeout  # for runtimes with a child process (llama-server)
        self.models: dict[str, ServedModel] = {}
        for spec in specs:
            name, _, p = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
            path = Path(p)
            if not path.exists():
                raise InputError(f"{path} does not exist")
            fmt, source = _open(path, verify)
            name = name or _default_name(path, source)
            if name in self.models:
                raise InputError(f"two models are named {name!r}; name them with NAME=PATH")
            self._runtime_class(fmt)  # a missing dependency fails now, not at the first request
            est = _estimate(fmt, source, self.parallel, n_ctx)
            if self.budget is not None and est > self.budget:
                raise InputError(f"{name} needs about {est / 2**30:.2f} GiB, more than the whole "
                                 f"--memory-budget of {self.budget / 2**30:.2f} GiB")  # fmt: skip
            self.models[name] = ServedModel(
                name, path, fmt, source, _template(fmt, path, source, chat_template), est
            )
        # Loads run on one long-lived thread: llama-server children are tied to the thread that
        # started them (PR_SET_PDEATHSIG), and loads should not compete with each other for memory.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orlik-load")
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            raise ModelNotFound(str(UnknownNameError("model", name, self.names())))
        return m

    def _runtime_class(self, fmt: str) -> type[Runtime]:
        return runtime_class(fmt, serving=True)  # GGUF: llama-server (orlik.registry says why)

    def loaded_bytes(self) -> int:
        return sum(m.est_bytes for m in self.models.values() if m.runtime is not None)

    def _make_room(self, model: ServedModel) -> None:
        if self.budget is None:
            return
        idle = sorted((m for m in self.models.values() if m.runtime is not None and m.active == 0 and m is not model),
                      key=lambda m: m.last_used)  # fmt: skip
        while self.loaded_bytes() + model.est_bytes > self.budget and idle:
            self.unload(idle.pop(0))
        if self.loaded_bytes() + model.est_bytes > self.budget:
            raise ServerBusy(f"{model.name} does not fit in the memory budget while other models are in use")

    def load_sync(self, model: ServedModel) -> Runtime:
        with self._lock:
            if model.runtime is not None and not model.runtime.alive():
                self.unload(model)  # a crashed llama-server child: start a fresh one
            if model.runtime is None:
                self._make_room(model)
                t0 = time.monotonic()
                cls = self._runtime_class(model.format)
                if model.format == "fp16":
                    _quiet_libraries()
                model.runtime = cls.load(model.source, parallel=self.parallel, threads=self.threads,
                                         n_ctx=self.n_ctx, alias=model.name, stall_timeout=self.stall_timeout)  # fmt: skip
                model.load_seconds = round(time.monotonic() - t0, 2)
            model.last_used = time.monotonic()
            return model.runtime

    def load_blocking(self, model: ServedModel) -> Runtime:
        """For callers without an event loop (orlik chat, --preload): still on the loader thread."""
        return self._loader.submit(self.load_sync, model).result()

    async def ensure_loaded(self, model: ServedModel) -> Runtime:
        if model.runtime is not None and model.runtime.alive():
            model.last_used = time.monotonic()
            return model.runtime
        if model._load_lock is None:
            model._load_lock = asyncio.Lock()
        async with model._load_lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._loader, self.load_sync, model)

    def semaphore(self, model: ServedModel) -> asyncio.Semaphore:
        if model._sem is None:
            model._sem = asyncio.Semaphore(self.parallel)
        return model._sem

    def unload(self, model: ServedModel) -> None:
        rt, model.runtime = model.runtime, None
        if rt is not None:
            rt.close()

    def close(self) -> None:
        for m in self.models.values():
            self.unload(m)
        self._loader.shutdown(wait=False, cancel_futures=True)
