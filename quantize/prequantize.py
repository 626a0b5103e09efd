"""The probes' matrices quantized ahead (Prequantized), on a core the sensitivity pass's
single-threaded steps leave idle, from the checkpoint's safetensors files; quantize/probes.py takes
them when the loaded model holds the same weights."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from orlik.quantize import probes


class Prequantized:
    """The layer-split probes' matrices quantized ahead, on one background thread, from the
    checkpoint's files (`read`: parameter name -> float32 array or None), while the main thread is
    busy with single-threaded work (importing torch and transformers, tokenizing, loading the
    model) or work that leaves a core idle; then the rows of the untied output head `head` (format's
    name) that its probes take (measure). `pause`/`resume` hold it off phases that would compete for
    the cores (OpenMP matmuls); `stop` drops what it has not started, which the probes then
    quantize themselves. A result is used only if the loaded model holds the same weights."""

    def __init__(self, probes_: list[probes.Probe], names: dict[str, str], read: Callable[[str], np.ndarray | None],
                 imat: dict[str, np.ndarray], fmt: probes.Format = probes.GGUF, head: str | None = None) -> None:  # fmt: skip
        import threading

        self._gate = threading.Event()
        self._gate.set()
        self._jobs: dict[tuple[str, str, int, int], Any] = {}  # (parameter, encoding, first row, row step)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="orlik-prequantize")
        self._fmt = fmt
        if fmt.quantize is None or fmt.dequantize is None:
            return
        every = probes.HEAD_EVERY * len(fmt.types)
        jobs = [
            (names[g], ty, 0, 1, imat.get(g))
            for pr in probes_
            if pr.split
            for g, ty in pr.chosen.items()
            if g in names
        ]
        jobs += [(names[g], ty, pr.index, every, imat.get(g)) for pr in probes_ if not pr.split
                 for g, ty in pr.chosen.items() if g == head and g in names]  # fmt: skip
        for name, ty, first, step, im in jobs:
            self._jobs[(name, ty, first, step)] = self._pool.submit(
                self._one, read, name, ty, first, step, im
            )

    def _one(self, read: Callable[[str], np.ndarray | None], name: str, ty: str, first: int, step: int,
             im: np.ndarray | None) -> Any:  # fmt: skip
        self._gate.wait()
        try:
            w = read(name)
        except (OSError, ValueError):  # the probe reads the loaded model's weights instead
            return None
        if w is None:
            return None
        w2 = np.ascontiguousarray(w.reshape(-1, w.shape[-1])[first::step])
        return self._fmt.quantize(ty, w2, im, 1), w2.shape, _sample_rows(w2)  # type: ignore[misc]

    def pause(self) -> None:
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        for f in self._jobs.values():
            f.cancel()
        self._gate.set()
        self._pool.shutdown(wait=False)

    def get(self, name: str, ty: str, w2: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray | None:
        """Parameter `name`'s `rows` (all when None; whose weights are `w2`) quantized to `ty` and read
        back, or None when they were not quantized ahead (or not from these weights)."""
        first, step = (
            (0, 1) if rows is None else (int(rows[0]), int(rows[1] - rows[0]) if len(rows) > 1 else 1)
        )
        if rows is not None and not np.array_equal(rows, np.arange(first, first + step * len(rows), step)):
            return None
        f = self._jobs.get((name, ty, first, step))
        if f is None or f.cancelled() or (not f.done() and f.cancel()):
            return None
        got = f.result()
        if got is None:
            return None
        data, shape, sample = got
        if shape != w2.shape or not np.array_equal(sample, _sample_rows(w2)):
            return None
        return self._fmt.dequantize(ty, data, shape)  # type: ignore[misc]


def _sample_rows(w2: np.ndarray) -> np.ndarray:
    """Eight rows spread over a matrix: enough to tell two copies of a checkpoint's weights apart."""
    return w2[:: max(1, w2.shape[0] // 8)].copy()
