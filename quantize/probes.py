"""Direct KLD probes that calibrate the Fisher estimate (sensitivity.py) against the model itself.

The second-order estimate assumes small errors that add up independently; at 2-4 bits, through
attention and the MLP's nonlinearity, and with every layer quantized at once, that can be off by a
different factor for each kind of matrix (on a barely trained 112M model it judged 2-bit block
matrices nearly free; they were not). So, for each tensor kind (token_embd, output, attn_q, ...,
ffn_down) and each probe type, every matrix of that kind is quantized at once with ggml's own
quantizer (same imatrix as llama-quantize), the FP32 model runs on calibration tokens, and the real
mean per-token KLD against the unquantized model is set against the summed estimate of the same
matrices. That ratio, interpolated in bits per weight between the probe types (held constant beyond
them), scales each candidate's estimate of that kind before the allocation. The probes run on
calibration windows disjoint from the Fisher pass's (sensitivity.split_windows), so the ratio is
not fitted to the tokens the estimate was made on.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.quantize import ggml_quants

# Where the estimate goes wrong is at low bits: on a 112M llama the block matrices' real KLD at Q2_K was
# 4-15x the estimate, at Q4_K and Q6_K 0.4-2.6x. A Q6_K probe moved no allocation there (the ratio is
# held at Q4_K's above it) and cost a third of the pass, so two probe types.
PROBE_TYPES = ("Q2_K", "Q4_K")
_BLOCK = re.compile(r"^blk\.\d+\.")
_LAYER = re.compile(r"\.\d+\.")


def kind(gguf_name: str) -> str:
    """'blk.3.ffn_down.weight' -> 'ffn_down'; 'output.weight' -> 'output'."""
    return _BLOCK.sub("", gguf_name).removesuffix(".weight")


@dataclass(frozen=True)
class Format:
    """What the probes need to know of a format: a tensor's kind, an encoding's bits per weight,
    the format's own quantize-dequantize, and the encodings to probe at."""

    kind: Callable[[str], str]
    bpw: Callable[[str], float]
    roundtrip: Callable[[str, np.ndarray, np.ndarray | None], np.ndarray]
    types: tuple[str, ...]


GGUF = Format(kind, lambda t: ggml_quants.info(t).bpw, ggml_quants.roundtrip, PROBE_TYPES)


def layer_kind(path: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'model.layers.mlp.down_proj' (MLX / checkpoint paths)."""
    return _LAYER.sub(".", path).removesuffix(".weight")


def nearest(probe: str, measured: dict[str, float], fmt: Format = GGUF) -> str:
    """The probe type if the tensor has it as a candidate, else its candidate closest in bpw."""
    if probe in measured:
        return probe
    want = fmt.bpw(probe)
    return min(measured, key=lambda t: (abs(fmt.bpw(t) - want), -fmt.bpw(t)))


def measure(ckpt: Checkpoint, windows: list[list[int]], names: dict[str, str], costs: dict[str, dict[str, float]],
            sizes: dict[str, int], imat: dict[str, np.ndarray], *, threads: int, fmt: Format = GGUF) -> dict[str, Any]:  # fmt: skip
    """{"tokens", "seconds", "kinds": {kind: [{"type", "bpw", "estimated", "real", "ratio"}]}} for the
    tensors `names` (format's name -> checkpoint parameter) whose estimates are `costs` and weight
    counts `sizes`, measured on the token `windows` (sensitivity.split_windows: disjoint from the
    Fisher pass's)."""
    import torch

    t0 = time.time()
    torch.set_num_threads(max(1, threads))
    x = torch.tensor(windows)
    model = ckpt.load_model(torch.float32).eval()
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=x).logits.double(), -1)
    groups: dict[str, list[str]] = {}
    for g in names:
        groups.setdefault(fmt.kind(g), []).append(g)
    out: dict[str, list[dict[str, Any]]] = {}
    for k, members in groups.items():
        for probe in fmt.types:
            chosen = {g: nearest(probe, costs[g], fmt) for g in members}
            est = sum(float(costs[g][chosen[g]]) for g in members)
            real = _probe(model, x, base, {names[g]: (chosen[g], imat.get(g)) for g in members}, threads, fmt)
            bpw = sum(fmt.bpw(chosen[g]) * sizes[g] for g in members) / sum(sizes[g] for g in members)
            ratio = real / est if est > 0 and real > 0 else None
            out.setdefault(k, []).append({"type": probe, "bpw": round(bpw, 4), "estimated": est,
                                          "real": real, "ratio": ratio})  # fmt: skip
            progress.info(f"auto: probe {k} at {probe}: estimated {est:.3g}, real {real:.3g}")
    return {
        "tokens": int(x.numel()),
        "types": list(fmt.types),
        "kinds": out,
        "seconds": round(time.time() - t0, 2),
    }


def used_rows(model: Any, name: str, x: Any) -> np.ndarray | None:
    """The rows of parameter `name` that the probe can reach: for an input embedding that is not
    also the output head, the token ids in `x` (ggml quantizes rows independently, so quantizing
    only these is exact); None (all rows) for anything else."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if model.get_parameter(name) is not emb.weight or (head is not None and head.weight is emb.weight):
        return None
    return np.unique(x.numpy())


def _probe(model: Any, x: Any, base: Any, params: dict[str, tuple[str, np.ndarray | None]], threads: int,
           fmt: Format = GGUF) -> float:  # fmt: skip
    """Mean per-token KLD(FP32 || model with `params` quantized), the weights restored afterwards."""
    import torch

    def quantized(item: tuple[str, tuple[str, np.ndarray | None]]) -> tuple[str, np.ndarray]:
        name, (ty, im) = item
        w = model.get_parameter(name).detach().numpy()
        w2 = w.reshape(-1, w.shape[-1])
        rows = used_rows(model, name, x)
        if rows is None:
            return name, fmt.roundtrip(ty, w2, im).reshape(w.shape)
        q = w2.copy()
        q[rows] = fmt.roundtrip(ty, np.ascontiguousarray(w2[rows]), im)
        return name, q.reshape(w.shape)

    saved = {n: model.get_parameter(n).detach().clone() for n in params}
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for name, q in pool.map(quantized, params.items()):
                model.get_parameter(name).data.copy_(torch.from_numpy(q))
        return mix_kld(model, x, base)
    finally:
        for n, w in saved.items():
            model.get_parameter(n).data.copy_(w)


def mix_kld(model: Any, x: Any, base: Any) -> float:
    """Mean over tokens of KL(base || model) on input ids `x`, base given as float64 log-probs."""
    import torch

    with torch.no_grad():
        logq = torch.log_softmax(model(input_ids=x).logits.double(), -1)
        return float((base.exp() * (base - logq)).sum(-1).mean())


def factor(points: list[dict[str, Any]], bpw: float) -> float:
    """real/estimated for a type of `bpw` bits per weight: log-linear interpolation between the
    probes of one kind, constant beyond the outermost ones; 1 when no probe gave a ratio."""
    pts = sorted((p["bpw"], math.log(p["ratio"])) for p in points if p.get("ratio"))
    if not pts:
        return 1.0
    if bpw <= pts[0][0]:
        return math.exp(pts[0][1])
    for (b0, r0), (b1, r1) in itertools.pairwise(pts):
        if bpw <= b1:
            w = (bpw - b0) / (b1 - b0) if b1 > b0 else 1.0
            return math.exp(r0 + w * (r1 - r0))
    return math.exp(pts[-1][1])


def scaled(costs: dict[str, dict[str, float]], probes: dict[str, Any] | None, fmt: Format = GGUF) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each tensor's estimated KLD per candidate encoding, scaled by its kind's probe ratio."""
    kinds = (probes or {}).get("kinds", {})
    out = {}
    for name, row in costs.items():
        pts = kinds.get(fmt.kind(name), [])
        out[name] = {ty: float(c) * factor(pts, fmt.bpw(ty)) for ty, c in row.items()}
    return out


def calibrated(table: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`scaled` for a GGUF sensitivity table."""
    return scaled({n: r["types"] for n, r in table["tensors"].items()}, table.get("probes"))
