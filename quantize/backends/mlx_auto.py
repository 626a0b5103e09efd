"""`--recipe mlx-auto`: per-layer MLX bits and group size chosen by measured sensitivity under a bpw
or size budget, with the allocator and Fisher sensitivity the GGUF auto recipe uses; MLX's own
affine quantizer (mx.quantize) measures each candidate's error, mlx-lm's quant predicate applies it.
The same direct KLD probes as GGUF (quantize/probes.py: every layer of a kind quantized at once with
mx.quantize, real KLD on calibration windows disjoint from the Fisher pass's) calibrate the estimate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ToolError
from orlik.fsutil import atomic_write_text, cache_root, sha256_bytes
from orlik.quantize import allocate, probes, sensitivity
from orlik.quantize.backends import Calibration, common
from orlik.quantize.recipe import Recipe
from orlik.sysinfo import usable_cores

METHOD = "fisher-diag+kind-probes-v4"
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DEFAULT_GROUP = 32  # mlx-lm skips layers whose width its default group does not divide: take the finest


PROBE_TYPES = ("2g64", "4g64")  # 2.5 and 4.5 bpw, as GGUF's Q2_K and Q4_K probes


def bpw(encoding: str) -> float:
    """'4g64' -> 4.5: the bits plus an FP16 scale and bias per group."""
    bits, group = (int(v) for v in encoding.split("g"))
    return bits + 32 / group


def roundtrip(
    encoding: str, rows: np.ndarray, imatrix: np.ndarray | None = None, threads: int = 1
) -> np.ndarray:
    """mx.quantize then mx.dequantize, as mlx-lm stores an affine layer (no importance matrix; MLX
    parallelizes by itself, so `threads` is not used)."""
    import mlx.core as mx

    bits, group = (int(v) for v in encoding.split("g"))
    q = mx.dequantize(*mx.quantize(mx.array(rows), group_size=group, bits=bits), group_size=group, bits=bits)
    return np.array(q, dtype=np.float32)


FORMAT = probes.Format(probes.layer_kind, bpw, roundtrip, PROBE_TYPES)


def option_bytes(rows: int, width: int, bits: int, group: int) -> int:
    """Packed weights plus an FP16 scale and bias per group, as mlx-lm stores an affine layer."""
    return rows * (width * bits // 8 + 4 * (width // group))


def kind(bits: int, group: int) -> str:
    return f"{bits}g{group}"


@dataclass
class Layer:
    path: str  # MLX module path (= checkpoint name without ".weight")
    rows: int
    width: int


def layers(ckpt: Checkpoint) -> tuple[list[Layer], int, int]:
    """Layers mlx-lm would quantize (2-D weights of Linear/Embedding whose width 32 divides), the
    checkpoint's parameter count, and the FP16 bytes of everything else."""
    shapes: dict[str, list[int]] = {}
    for f in ckpt.weight_files:
        for name, meta in common.safetensors_header(f).items():
            shapes[name] = [int(d) for d in meta["shape"]]
    mats = [Layer(n.removesuffix(".weight"), s[0], s[1]) for n, s in shapes.items()
            if n.endswith(".weight") and len(s) == 2 and "norm" not in n and s[1] % DEFAULT_GROUP == 0]  # fmt: skip
    params = sum(int(np.prod(s)) for s in shapes.values())
    fixed = 2 * (params - sum(m.rows * m.width for m in mats))
    return mats, params, fixed


def target_bytes(recipe: Recipe, params: int) -> int:
    o = recipe.options
    if o.get("target_bpw") is not None:
        return int(float(o["target_bpw"]) * params / 8)
    if o.get("target_size") is not None:
        return allocate.parse_size(o["target_size"])
    raise InputError(f"recipe {recipe.name} needs a target: --target-size SIZE or --target-bpw BPW")


def _costs(w: np.ndarray, pairs: sensitivity.Pairs, rows: np.ndarray, scale: np.ndarray) -> dict[str, float]:
    import mlx.core as mx

    sub = w[rows]
    x = mx.array(sub)
    out = {}
    for g in GROUPS:
        if sub.shape[1] % g:
            continue
        for b in BITS:
            q = mx.dequantize(*mx.quantize(x, group_size=g, bits=b), group_size=g, bits=b)
            err2 = (np.array(q, dtype=np.float32) - sub).astype(np.float64) ** 2
            out[kind(b, g)] = sensitivity.weighted_error(pairs, rows, scale, err2)
    return out


def sensitivity_table(ckpt: Checkpoint, recipe: Recipe, calib: Calibration, threads: int) -> dict[str, Any]:
    """{"layers": {path: {kind: estimated KLD}}, "tokens", ...}, cached per checkpoint and calibration."""
    o = recipe.options
    settings = sensitivity.base_settings(o)
    key = sha256_bytes(json.dumps({"method": METHOD, "format": "mlx", "checkpoint": ckpt.hash,
                                   "calibration": calib.hash, **settings}, sort_keys=True).encode())  # fmt: skip
    path = cache_root() / "sensitivity" / f"mlx-{key}.json"
    if (table := sensitivity.read_cached(path)) is not None:
        return {**table, "cached": True}
    t0 = time.time()
    texts = common.calibration_texts(calib, recipe, None)
    windows, probe_windows, model = sensitivity.windows_and_model(ckpt, texts, settings, threads)
    fis = sensitivity.fisher(model, windows, seed=settings["seed"], dtype=settings["dtype"])
    read = sensitivity.weight_reader(model)
    mats, _, _ = layers(ckpt)

    def measure(m: Layer) -> tuple[str, dict[str, float]]:
        pairs = fis.weights.get(m.path + ".weight")
        if pairs is None:
            raise InputError(f"mlx-auto: no sensitivity for {m.path} (not a Linear or Embedding layer)")
        rows, scale = sensitivity.sample_rows(
            pairs, m.rows, settings["rows"], settings["seed"], settings["max_rows"], settings["min_rows"]
        )
        return m.path, _costs(read(m.path + ".weight"), pairs, rows, scale)

    # One thread: MLX evaluates lazily on its own stream, and its CPU kernels are already parallel.
    table = {"method": METHOD, "layers": dict(map(measure, mats)), "tokens": fis.tokens,
             "seconds": round(time.time() - t0, 2)}  # fmt: skip
    if probe_windows:  # one thread: MLX evaluates lazily on its own stream
        table["probes"] = probes.measure(model, probe_windows, {m.path: m.path + ".weight" for m in mats}, table["layers"],
                                         {m.path: m.rows * m.width for m in mats}, {}, threads=1, fmt=FORMAT,
                                         pairs={m.path: fis.weights[m.path + ".weight"] for m in mats})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table) + "\n")
    return {**table, "cached": False}


def plan(ckpt: Checkpoint, recipe: Recipe, calib: Calibration, threads: int) -> dict[str, Any]:
    """{layer path: "<bits>g<group>"} for the recipe's target, with the estimate, for variant.json."""
    if calib.jsonl is None:
        raise InputError(
            f"recipe {recipe.name} measures sensitivity on the calibration set; pass --calib DIR"
        )
    mats, params, fixed = layers(ckpt)
    target = target_bytes(recipe, params)
    shapes = {m.path: m for m in mats}

    def opts(m: Layer, costs: dict[str, float]) -> list[allocate.Option]:
        return [allocate.Option(k, option_bytes(m.rows, m.width, int(k.split("g")[0]), int(k.split("g")[1])), c)
                for k, c in costs.items()]  # fmt: skip

    zero = {
        m.path: opts(m, {kind(b, g): 0.0 for g in GROUPS if m.width % g == 0 for b in BITS}) for m in mats
    }
    budget = allocate.check_target(target, fixed, zero, 2 * params, "FP16 checkpoint")
    table = sensitivity_table(ckpt, recipe, calib, threads)
    costs = probes.scaled(table["layers"], table.get("probes"), FORMAT)
    sol = allocate.solve({p: opts(shapes[p], c) for p, c in costs.items()}, budget)
    fisher = probes.row_corrected(table["layers"], table.get("probes"))
    fisher_only = sum(fisher[p][o.kind] for p, o in sol.choice.items())
    progress.info(
        f"mlx-auto: {len(mats)} layers, estimated KLD {sol.cost:.4g}, {8 * (fixed + sol.bytes) / params:.3f} bpw"
    )
    return {"method": METHOD, "target_bytes": target, "planned_bytes": fixed + sol.bytes, "estimated_kld": sol.cost,
            "estimated_kld_fisher": fisher_only, "probes": table.get("probes"),
            "sensitivity_cached": table["cached"], "sensitivity_tokens": table["tokens"],
            "layers": {p: {"type": o.kind, "estimated_kld": o.cost} for p, o in sol.choice.items()}}  # fmt: skip


def quantize(backend: Any, ckpt: Checkpoint, recipe: Recipe, calib: Calibration, out: Path) -> Any:
    """Plan, then run the MLX backend's own conversion with one override per layer."""
    import dataclasses

    threads = usable_cores()
    t0 = time.time()
    record = plan(ckpt, recipe, calib, threads)
    t1 = time.time()
    overrides = tuple((p, v["type"]) for p, v in record["layers"].items())
    fixed = dataclasses.replace(recipe, bits=4, group_size=DEFAULT_GROUP, overrides=overrides, options={})
    v = backend.quantize(ckpt, fixed, calib, out)
    data = int(v.extra["tensor_bytes"])
    record["seconds"] = {"plan": round(t1 - t0, 2), "convert": round(time.time() - t1, 2)}
    record["tensor_bytes"] = data
    record["size_error"] = round(data / record["target_bytes"] - 1, 6)
    if abs(record["size_error"]) > 0.01:
        raise ToolError(
            f"{recipe.name}: {data:,} bytes of weights, not within 1% of the target {record['target_bytes']:,}"
        )
    v.name, v.recipe = recipe.name, recipe.to_dict()
    v.extra["auto"] = record
    return v
