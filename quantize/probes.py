"""Direct KLD probes that calibrate the Fisher estimate (sensitivity.py) against the model itself.

The second-order estimate assumes small errors that add up independently; at 2-4 bits, through
attention and the MLP's nonlinearity, and with every layer quantized at once, that can be off by a
different factor for each kind of matrix (on a barely trained 112M model it judged 2-bit block
matrices nearly free; they were not). So, for each tensor kind (token_embd, output, attn_q, ...,
ffn_down) and each probe type, every matrix of that kind is quantized at once with ggml's own
quantizer (same imatrix as llama-quantize), the FP32 model runs on calibration tokens, and the real
mean per-token KLD against the unquantized model is set against the summed estimate of the same
matrices. That ratio, interpolated in bits per weight between the probe types (held constant beyond
them), scales each candidate's estimate of that kind before the allocation.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.quantize import ggml_quants, sensitivity

# Where the estimate goes wrong is at low bits: on a 112M llama the block matrices' real KLD at Q2_K was
# 4-15x the estimate, at Q4_K and Q6_K 0.4-2.6x.
PROBE_TYPES = ("Q2_K", "Q4_K", "Q6_K")
_BLOCK = re.compile(r"^blk\.\d+\.")


def kind(gguf_name: str) -> str:
    """'blk.3.ffn_down.weight' -> 'ffn_down'; 'output.weight' -> 'output'."""
    return _BLOCK.sub("", gguf_name).removesuffix(".weight")


def nearest(probe: str, measured: dict[str, float]) -> str:
    """The probe type if the tensor has it as a candidate, else its candidate closest in bpw."""
    if probe in measured:
        return probe
    want = ggml_quants.info(probe).bpw
    return min(measured, key=lambda t: (abs(ggml_quants.info(t).bpw - want), -ggml_quants.info(t).bpw))


def measure(ckpt: Checkpoint, texts: list[str], names: dict[str, str], rows: dict[str, Any],
            imat: dict[str, np.ndarray], *, tokens: int, seq_len: int, types: tuple[str, ...],
            threads: int) -> dict[str, Any]:  # fmt: skip
    """{"tokens", "seconds", "kinds": {kind: [{"type", "bpw", "estimated", "real", "ratio"}]}} for the
    GGUF tensors `names` (gguf name -> checkpoint parameter) whose estimates are `rows`."""
    import torch

    t0 = time.time()
    torch.set_num_threads(max(1, threads))
    x = torch.tensor(sensitivity._token_windows(ckpt, texts, tokens, seq_len))
    model = ckpt.load_model(torch.float32).eval()
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=x).logits.double(), -1)
    groups: dict[str, list[str]] = {}
    for g in names:
        groups.setdefault(kind(g), []).append(g)
    out: dict[str, list[dict[str, Any]]] = {}
    for k, members in groups.items():
        for probe in types:
            chosen = {g: nearest(probe, rows[g]["types"]) for g in members}
            est = sum(float(rows[g]["types"][chosen[g]]) for g in members)
            real = _probe(model, x, base, {names[g]: (chosen[g], imat.get(g)) for g in members}, threads)
            n = sum(int(np.prod(rows[g]["ne"])) for g in members)
            bpw = sum(ggml_quants.info(chosen[g]).bpw * int(np.prod(rows[g]["ne"])) for g in members) / n
            ratio = real / est if est > 0 and real > 0 else None
            out.setdefault(k, []).append({"type": probe, "bpw": round(bpw, 4), "estimated": est,
                                          "real": real, "ratio": ratio})  # fmt: skip
            progress.info(f"auto: probe {k} at {probe}: estimated {est:.3g}, real {real:.3g}")
    return {
        "tokens": int(x.numel()),
        "types": list(types),
        "kinds": out,
        "seconds": round(time.time() - t0, 2),
    }


def _probe(
    model: Any, x: Any, base: Any, params: dict[str, tuple[str, np.ndarray | None]], threads: int
) -> float:
    """Mean per-token KLD(FP32 || model with `params` quantized), the weights restored afterwards."""
    import torch

    def quantized(item: tuple[str, tuple[str, np.ndarray | None]]) -> tuple[str, np.ndarray]:
        name, (ty, im) = item
        w = model.get_parameter(name).detach().numpy()
        return name, ggml_quants.roundtrip(ty, w.reshape(-1, w.shape[-1]), im).reshape(w.shape)

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


def calibrated(table: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each tensor's estimated KLD per candidate type, scaled by its kind's probe ratio."""
    kinds = (table.get("probes") or {}).get("kinds", {})
    out = {}
    for name, row in table["tensors"].items():
        pts = kinds.get(kind(name), [])
        out[name] = {ty: float(c) * factor(pts, ggml_quants.info(ty).bpw) for ty, c in row["types"].items()}
    return out
