"""`orlik train upscale`: depth up-scaling (SOLAR, Bielik 11B v2) from layer ranges, streamed.

`--layers 0-23,8-31` on a 32-layer model stacks layers 0..23 and then 8..31: 48 layers, the
middle 16 twice. Ranges are inclusive. The output's `model.layers.<i>.` tensors are renumbered
0..47 and config.json's num_hidden_layers (and per-layer lists such as layer_types) follow; every
other tensor (embeddings, final norm, lm_head) is copied unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.errors import CheckpointError, InputError
from orlik.fsutil import atomic_dir, atomic_write_text
from orlik.training import tensorio

if TYPE_CHECKING:
    import torch

_LAYER = re.compile(r"^((?:model\.)?layers)\.(\d+)\.(.+)$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
# config.json lists with one entry per layer (transformers 5 writes layer_types for most families).
_PER_LAYER_KEYS = ("layer_types",)


def parse_ranges(spec: str, n_layers: int) -> list[tuple[int, int]]:
    """'0-23,8-31' -> [(0, 23), (8, 31)], checked against the model's depth.

    Consecutive ranges may overlap (the overlap is what gets duplicated), but each must start and end
    after the one before it: a range lying wholly inside the previous one, or going backwards, is
    refused as a likely typo."""
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if not m:
            raise InputError(f"bad layer range {part.strip()!r} in {spec!r}; write ranges like 0-23,8-31")
        a, b = int(m.group(1)), int(m.group(2))
        if a > b:
            raise InputError(f"layer range {a}-{b} runs backwards")
        if b >= n_layers:
            raise InputError(f"layer range {a}-{b} is out of range: the model has layers 0-{n_layers - 1}")
        if ranges and not (a > ranges[-1][0] and b > ranges[-1][1]):
            pa, pb = ranges[-1]
            raise InputError(f"layer ranges {pa}-{pb} and {a}-{b} overlap out of order: each range must "
                             "start and end after the previous one")  # fmt: skip
        ranges.append((a, b))
    return ranges


def layer_map(ranges: list[tuple[int, int]]) -> list[int]:
    """New layer index -> source layer index."""
    return [i for a, b in ranges for i in range(a, b + 1)]


def _plan_tensors(
    tensors: dict[str, tensorio.TensorInfo], src_of: list[int], n_layers: int
) -> list[tuple[str, tensorio.TensorInfo]]:
    """(output name, source tensor) in output order: non-layer tensors before the layers, as read."""
    by_layer: dict[int, list[tuple[str, tensorio.TensorInfo]]] = {}
    head, tail = [], []
    seen_layer = False
    for name, info in tensors.items():
        m = _LAYER.match(name)
        if m:
            seen_layer = True
            i = int(m.group(2))
            if i >= n_layers:
                raise CheckpointError(f"tensor {name} is past num_hidden_layers={n_layers}")
            by_layer.setdefault(i, []).append((f"{m.group(1)}.{{}}.{m.group(3)}", info))
        else:
            (tail if seen_layer else head).append((name, info))
    missing = sorted(set(range(n_layers)) - set(by_layer))
    if missing:
        raise CheckpointError(f"the checkpoint has no tensors for layers {missing[:5]}")
    planned = list(head)
    for new, src in enumerate(src_of):
        planned += [(tpl.format(new), info) for tpl, info in by_layer[src]]
    return planned + tail


def run(checkpoint: Path, layers: str, out: Path, force: bool = False) -> dict[str, Any]:
    ckpt = Checkpoint.open(checkpoint)
    n = ckpt.config.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 0:
        raise CheckpointError(f"{ckpt.path}/config.json has no num_hidden_layers")
    ranges = parse_ranges(layers, n)
    src_of = layer_map(ranges)
    tensors = tensorio.checkpoint_tensors(ckpt.weight_files)
    planned = _plan_tensors(tensors, src_of, n)
    out_tensors = [tensorio.OutTensor(name, info.dtype, info.shape) for name, info in planned]

    def produce(reader: tensorio.TensorReader, bar: Any) -> Iterator[Iterator[torch.Tensor]]:
        for _, info in planned:
            yield reader.chunks(info)  # copied piece by piece: flat memory
            bar.advance(1)

    cfg = dict(ckpt.config)
    cfg["num_hidden_layers"] = len(src_of)
    for key in _PER_LAYER_KEYS:
        if isinstance(cfg.get(key), list) and len(cfg[key]) == n:
            cfg[key] = [cfg[key][i] for i in src_of]
    if isinstance(cfg.get("max_window_layers"), int):  # qwen2: layers below this use full attention
        cfg["max_window_layers"] = min(cfg["max_window_layers"], len(src_of))
    with atomic_dir(Path(out), force=force, kind="checkpoint") as tmp, tensorio.TensorReader() as reader:
        with progress.bar("upscale", total=len(planned)) as bar:
            files = tensorio.write_checkpoint_weights(tmp, out_tensors, produce(reader, bar))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        tensorio.copy_side_files(ckpt.path, tmp)
        summary = {"out": str(out), "source": str(ckpt.path), "source_hash": ckpt.hash, "layers": layers,
                   "source_layers": n, "num_hidden_layers": len(src_of), "layer_map": src_of,
                   "tensors": len(planned), "files": files}  # fmt: skip
        atomic_write_text(tmp / "upscale.json", json.dumps(summary, indent=1) + "\n")
    return summary
