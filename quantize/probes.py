"""Direct KLD probes that calibrate the Fisher estimate (sensitivity.py) against the model itself.

The second-order estimate assumes small errors that add up independently; at 2-4 bits, through
attention and the MLP's nonlinearity, and with every layer quantized at once, that can be off by a
different factor for each kind of matrix (on a barely trained 112M model it judged 2-bit block
matrices nearly free; they were not). So, for each tensor kind (token_embd, output, attn_v, ...,
ffn_down; attn_q with attn_k and ffn_gate with ffn_up as one group, see _SHARED) and each probe
type, the matrices of that kind (split between the probe types by layer) are quantized at once
with ggml's own quantizer (same imatrix as llama-quantize), the FP32 model runs on calibration
tokens, and the real mean per-token KLD against the unquantized model is set against the summed
estimate of the same matrices. The KLD is scored where llama-perplexity --kl-divergence and `orlik
bench` score it: the second half of each window (positions n/2 .. n-2 of n), whose predictions see at
least half a window of context; the output head runs on those positions only. That ratio, interpolated in bits per weight between the probe types
(held constant beyond them), scales each candidate's estimate of that kind before the allocation.
The probes run on calibration windows disjoint from the Fisher pass's (sensitivity.split_windows),
so the ratio is not fitted to the tokens the estimate was made on.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from orlik import progress
from orlik.quantize import ggml_quants, sensitivity

if TYPE_CHECKING:
    from orlik.quantize import prequantize

# Where the estimate goes wrong is at low bits: on a 112M llama the block matrices' real KLD at Q2_K was
# 4-15x the estimate, at Q4_K and Q6_K 0.4-2.6x. A Q6_K probe moved no allocation there (the ratio is
# held at Q4_K's above it) and cost a third of the pass, so two probe types.
PROBE_TYPES = ("Q2_K", "Q4_K")
# An untied output head's probe quantizes one row in HEAD_EVERY * len(types): each row's error reaches
# only its own logit, so the KLD is a sum over rows to second order and the real/estimated ratio does
# not depend on how many rows are quantized; a quarter of the rows at each type (half of them in all)
# costs half the quantization of splitting every row between the types (on a 150k vocabulary at 896
# wide the head is over a quarter of the model's weights).
HEAD_EVERY = 2
_BLOCK = re.compile(r"^blk\.\d+\.")
_LAYER = re.compile(r"\.\d+\.")


# Matrices that feed one nonlinearity together share a probe, and so a ratio: the query and key
# projections (their product is the attention score) and the MLP's gate and up projections (their
# product is SwiGLU's input). On real-100m-v3 (v4's separate probes) their ratios were alike (attn_q
# 0.71 / 1.52 against attn_k 1.00 / 1.40 at Q2_K / Q4_K; ffn_gate 20.0 / 2.78 against ffn_up
# 23.6 / 2.14), while attn_v and attn_output differed from every other kind; sharing saves 4 of 17
# forward passes.
_SHARED = {"attn_q": "attn_qk", "attn_k": "attn_qk", "ffn_gate": "ffn_gate_up", "ffn_up": "ffn_gate_up",
           "q_proj": "qk_proj", "k_proj": "qk_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}  # fmt: skip


def _shared(name: str) -> str:
    """The probe group of a kind: its last dotted part through _SHARED, if it is there."""
    head, _, last = name.rpartition(".")
    group = _SHARED.get(last, last)
    return f"{head}.{group}" if head else group


def kind(gguf_name: str) -> str:
    """A GGUF tensor's probe group: 'blk.3.ffn_down.weight' -> 'ffn_down', 'output.weight' ->
    'output', 'blk.3.attn_q.weight' -> 'attn_qk' (see _SHARED)."""
    return _shared(_BLOCK.sub("", gguf_name).removesuffix(".weight"))


@dataclass(frozen=True)
class Format:
    """What the probes need to know of a format: a tensor's kind, an encoding's bits per weight,
    the format's own quantize-dequantize, and the encodings to probe at."""

    kind: Callable[[str], str]
    bpw: Callable[[str], float]
    roundtrip: Callable[..., np.ndarray]  # (encoding, rows, imatrix, threads) -> rows quantized and back
    types: tuple[str, ...]
    # the two halves of `roundtrip`, where the format has a compact encoded form (which
    # prequantize.Prequantized keeps)
    quantize: Callable[..., np.ndarray] | None = None  # (encoding, rows, imatrix, threads) -> encoded rows
    dequantize: Callable[..., np.ndarray] | None = None  # (encoding, encoded, shape) -> float32 rows


GGUF = Format(kind, lambda t: ggml_quants.info(t).bpw, ggml_quants.roundtrip, PROBE_TYPES, ggml_quants.quantize,
              ggml_quants.dequantize)  # fmt: skip


def layer_kind(path: str) -> str:
    """A checkpoint (MLX) layer's probe group: 'model.layers.3.mlp.down_proj' ->
    'model.layers.mlp.down_proj', 'model.layers.3.mlp.up_proj' -> 'model.layers.mlp.gate_up_proj'."""
    return _shared(_LAYER.sub(".", path).removesuffix(".weight"))


def nearest(probe: str, measured: dict[str, float], fmt: Format = GGUF) -> str:
    """The probe type if the tensor has it as a candidate, else its candidate closest in bpw."""
    if probe in measured:
        return probe
    want = fmt.bpw(probe)
    return min(measured, key=lambda t: (abs(fmt.bpw(t) - want), -fmt.bpw(t)))


@dataclass(frozen=True)
class Probe:
    group: str  # a kind, or kinds that share a probe (fmt.kind)
    index: int  # which of fmt.types
    type: str
    chosen: dict[str, str]  # each quantized tensor -> its encoding (the probe type or its nearest candidate)
    split: bool  # the group's layers are split between the probe types (each matrix in one probe)


def plan(candidates: dict[str, Collection[str]], fmt: Format = GGUF) -> list[Probe]:
    """The probes of the tensors whose candidate encodings are `candidates` (format's name -> encodings).

    The tensors are grouped by `fmt.kind` (a kind, or kinds that share a probe). A group spanning at
    least as many layers as there are probe types is split among them by layer, alternating (with
    two types: even layers at the first, odd at the second), so each matrix is quantized once and
    each ratio still spans the depth; a smaller group is quantized whole at each type."""
    groups: dict[str, list[str]] = {}
    for g in sorted(candidates, key=_depth):
        groups.setdefault(fmt.kind(g), []).append(g)
    n_types = len(fmt.types)
    out = []
    for k, members in groups.items():
        layers = sorted({_depth(g)[0] for g in members})
        split = len(layers) >= n_types
        for j, probe in enumerate(fmt.types):
            subset = [g for g in members if layers.index(_depth(g)[0]) % n_types == j] if split else members
            out.append(Probe(k, j, probe, {g: nearest(probe, candidates[g], fmt) for g in subset}, split))
    return out


def measure(model: Any, windows: list[list[int]], names: dict[str, str], costs: dict[str, dict[str, float]],
            sizes: dict[str, int], imat: dict[str, np.ndarray], *, threads: int, fmt: Format = GGUF,
            pairs: dict[str, sensitivity.Pairs] | None = None, pre: prequantize.Prequantized | None = None) -> dict[str, Any]:  # fmt: skip
    """{"tokens", "seconds", "kinds": {group: [{"type", "bpw", "matrices", "estimated", "real", "ratio"}]}}
    for the tensors `names` (format's name -> parameter of `model`, sensitivity.load_model) whose
    estimates are `costs` and weight counts `sizes`, measured on the token `windows`
    (sensitivity.split_windows: disjoint from the Fisher pass's), one forward pass per `plan` probe.

    An untied output head, alone in its group, is probed on rows instead: one row in
    HEAD_EVERY * len(fmt.types) from the probe type's index (with two types, rows 0::4 at the first
    and 1::4 at the second), on
    the final hidden states of the unquantized run, its only input, when the model's logits are
    exactly the head applied to them. With the Fisher `pairs`, a probe's estimate is the
    Fisher estimate of exactly the weights it quantized (every row, no sampling); without them, or
    for an embedding probed on its used rows, it is the sum of the matrices' `costs`. Matrices
    that `pre` quantized ahead are taken from it."""
    import torch

    t0 = time.time()
    if pre is not None:
        pre.stop()  # what it has not started is quantized here, with every thread
    x = torch.tensor(windows)
    head = Head(model, x)
    n_types = len(fmt.types)
    out: dict[str, list[dict[str, Any]]] = {}
    matrices: dict[str, dict[str, Any]] = {}
    for pr in plan({g: costs[g] for g in names}, fmt):
        subset = list(pr.chosen)
        split_rows = len(subset) == 1 and pairs is not None and head.alone(model, [names[subset[0]]])
        every = HEAD_EVERY * n_types
        params = {names[g]: (ty, imat.get(g), _rows(model, names[g], pr.index, every) if split_rows else None)
                  for g, ty in pr.chosen.items()}  # fmt: skip
        fisher = {names[g]: pairs[g] for g in subset} if pairs is not None else {}
        whole: dict[str, float] = {}
        real, exact = _probe(model, x, head, params, threads, fmt, fisher, pre, whole)
        for g, ty in pr.chosen.items():
            if names[g] in whole:
                matrices[g] = {"type": ty, "estimated": whole[names[g]]}
        est = exact if exact is not None else sum(float(costs[g][ty]) for g, ty in pr.chosen.items())
        bpw = sum(fmt.bpw(ty) * sizes[g] for g, ty in pr.chosen.items()) / sum(sizes[g] for g in subset)
        ratio = real / est if est > 0 and real > 0 else None
        out.setdefault(pr.group, []).append({"type": pr.type, "bpw": round(bpw, 4), "matrices": len(subset),
                                             "rows": f"{pr.index}::{every}" if split_rows else "all",
                                             "estimated": est, "real": real, "ratio": ratio})  # fmt: skip
        progress.info(f"auto: probe {pr.group} at {pr.type}: estimated {est:.3g}, real {real:.3g}")
    return {
        "tokens": int(x.numel()),
        "scored_tokens": int(head.base.z.shape[0] * head.base.z.shape[1]),
        "types": list(fmt.types),
        "kinds": out,
        "matrices": matrices,
        "seconds": round(time.time() - t0, 2),
    }


def _rows(model: Any, name: str, j: int, every: int) -> np.ndarray:
    """Every `every`-th row of parameter `name`, from row j."""
    shape = model.get_parameter(name).shape
    return np.arange(j, int(np.prod(shape[:-1])), every)


def _depth(name: str) -> tuple[int, str]:
    """Sort key: the first layer index in a tensor's name (blk.7..., model.layers.7...), then the name."""
    m = re.search(r"\.(\d+)\.", f".{name}")
    return (int(m.group(1)) if m else -1, name)


def scored_logits(model: Any, x: Any) -> Any:
    """The logits of the token windows `x` [windows, n] at the positions the KLD is scored on,
    n//2 .. n-2 (llama-perplexity's: each prediction sees at least half a window, and the last
    position predicts a token outside the window). Where the model's forward takes
    `logits_to_keep` (transformers' causal LMs do), the head runs on those positions only: a third
    of a probe's matmuls on a 32k vocabulary at 768 wide."""
    import inspect

    n = x.shape[1]
    keep = n - n // 2
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=x, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=x).logits
    return logits[:, -keep:-1]


class Head:
    """The unquantized run's scored logits (scored_logits) and, where they are exactly the output
    head applied to the final hidden states, those states, so that a probe of the head alone is
    that one matmul."""

    def __init__(self, model: Any, x: Any) -> None:
        import torch

        self.module = model.get_output_embeddings()
        seen: list[Any] = []
        hook = self.module.register_forward_hook(lambda m, a, o: seen.append(a[0])) if self.module else None
        try:
            with torch.no_grad():
                logits = scored_logits(model, x)
        finally:
            if hook is not None:
                hook.remove()
        self.base = Reference(logits)
        self.hidden = None
        if len(seen) == 1 and seen[0].shape[1] > logits.shape[1]:
            hidden = seen[0][:, -logits.shape[1] - 1 : -1]  # the head's input at the scored positions
            with torch.no_grad():
                again = self.module(hidden)
            if again.shape == logits.shape and torch.equal(again, logits):
                self.hidden = hidden
        emb = model.get_input_embeddings()
        self.untied = self.module is not None and self.module.weight is not emb.weight

    def alone(self, model: Any, params: Collection[str]) -> bool:
        """True when `params` is the untied head alone and its hidden states are known."""
        if self.hidden is None or not self.untied or len(params) != 1:
            return False
        return model.get_parameter(next(iter(params))) is self.module.weight


def used_rows(model: Any, name: str, x: Any) -> np.ndarray | None:
    """The rows of parameter `name` that the probe can reach: for an input embedding that is not
    also the output head, the token ids in `x` (ggml quantizes rows independently, so quantizing
    only these is exact); None (all rows) for anything else."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if model.get_parameter(name) is not emb.weight or (head is not None and head.weight is emb.weight):
        return None
    return np.unique(x.numpy())


Param = tuple[str, np.ndarray | None, np.ndarray | None]  # (encoding, importance matrix, rows or None: all)


def _probe(model: Any, x: Any, head: Head, params: dict[str, Param], threads: int, fmt: Format = GGUF,
           pairs: dict[str, sensitivity.Pairs] | None = None, pre: prequantize.Prequantized | None = None,
           whole: dict[str, float] | None = None) -> tuple[float, float | None]:  # fmt: skip
    """(mean per-token KLD(FP32 || model with `params` quantized), the Fisher estimate of exactly
    the quantized weights, or None when `pairs` lacks one or an embedding was probed on its used
    rows); the weights are restored afterwards. `whole` gets the Fisher estimate of each matrix
    quantized whole (every row), by parameter name."""
    import torch

    pairs = pairs or {}
    inner = threads if len(params) == 1 else 1  # one matrix: its rows split between the threads

    def quantized(item: tuple[str, Param]) -> tuple[str, np.ndarray, float | None, bool]:
        name, (ty, im, rows) = item
        w = model.get_parameter(name).detach().numpy()
        w2 = w.reshape(-1, w.shape[-1])
        used = used_rows(model, name, x) if rows is None else None
        every_row = rows is None and used is None
        if every_row:
            q = pre.get(name, ty, w2) if pre is not None else None
            q = fmt.roundtrip(ty, w2, im, inner) if q is None else q
            rows = np.arange(w2.shape[0])
            err2 = np.subtract(q, w2)
            np.square(err2, out=err2)
        else:
            q = w2.copy()
            pick = rows if rows is not None else used
            sub = np.ascontiguousarray(w2[pick])
            got = pre.get(name, ty, sub, rows) if pre is not None and rows is not None else None
            q[pick] = fmt.roundtrip(ty, sub, im, inner) if got is None else got
            err2 = np.square(q[pick] - w2[pick])
        exact = None
        if name in pairs and used is None:
            exact = sensitivity.weighted_error(pairs[name], rows, np.ones(len(rows)), err2)
        return name, q.reshape(w.shape), exact, every_row

    # the quantized weights are swapped in and the originals back (no copies of either)
    saved = {n: model.get_parameter(n).data for n in params}
    try:
        estimates = []
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for name, q, exact, every_row in pool.map(quantized, params.items()):
                model.get_parameter(name).data = torch.from_numpy(q)
                estimates.append(exact)
                if whole is not None and every_row and exact is not None:
                    whole[name] = exact
        with torch.no_grad():
            if head.alone(model, params):
                real = kld(head.base, head.module(head.hidden))
            else:
                real = kld(head.base, scored_logits(model, x))
        return real, (None if None in estimates else float(sum(estimates)))  # type: ignore[arg-type]
    finally:
        for n, w in saved.items():
            model.get_parameter(n).data = w


def kld(base: Any, logits: Any) -> float:
    """Mean over tokens of KL(base || softmax(logits)), `base` a Reference (or the unquantized
    logits). With d = logits - base logits and p the base probabilities, per token
    KL = log(sum p e^d) - sum p d = log1p(a + b) - b, where b = sum p d and a = sum p (e^d - 1 - d) >= 0:
    no term is a difference of two large numbers, so float32 elementwise work keeps KLDs of 1e-8
    (tests/test_probes.py checks it against the float64 formula); an error in b moves KL by only
    (a + b) times as much. Done 64 tokens at a time: whole-vocabulary temporaries of every token at
    once cost more in page faults than in arithmetic."""
    import torch

    ref = base if isinstance(base, Reference) else Reference(base)
    z = logits.reshape(-1, logits.shape[-1])
    p, z0 = ref.p.reshape(z.shape), ref.z.reshape(z.shape)
    total = 0.0
    for i in range(0, z.shape[0], 64):
        d = z[i : i + 64].float() - z0[i : i + 64]
        pi = p[i : i + 64]
        b = (pi * d).sum(-1).double()
        a = torch.expm1(d).sub_(d).mul_(pi).sum(-1).double()
        total += float((torch.log1p(a + b) - b).sum())
    return total / z.shape[0]


class Reference:
    """The unquantized logits (float32) and their probabilities, computed once."""

    def __init__(self, logits: Any) -> None:
        import torch

        self.z = logits.detach().float()
        self.p = torch.softmax(self.z, -1)


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


def row_corrected(costs: dict[str, dict[str, float]], probes: dict[str, Any] | None) -> dict[str, dict[str, float]]:  # fmt: skip
    """The row-sampled estimates (gguf_auto._tensor_costs, sensitivity.sample_rows) of every matrix a
    probe quantized whole, scaled by exact/sampled at its probe type: the Fisher estimate of all its
    rows at that type, which the probe computes anyway, against the sampled one. A row that errs
    much at one type errs much at all, so the factor carries over; on real-100m-v3 it took the rms
    error of a matrix's sampled estimates from 4-15 % to 1-3 % at half the rows. Other matrices (an
    embedding probed on its used rows, a head on some rows) keep their sampled estimates."""
    whole = (probes or {}).get("matrices", {})
    out = {}
    for name, row in costs.items():
        m = whole.get(name)
        sampled = row.get(m["type"]) if m else None
        f = m["estimated"] / sampled if m and sampled and sampled > 0 and m["estimated"] > 0 else 1.0
        out[name] = {ty: float(c) * f for ty, c in row.items()}
    return out


def scaled(costs: dict[str, dict[str, float]], probes: dict[str, Any] | None, fmt: Format = GGUF) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each tensor's estimated KLD per candidate encoding (row_corrected), scaled by its kind's
    probe ratio."""
    kinds = (probes or {}).get("kinds", {})
    out = {}
    for name, row in row_corrected(costs, probes).items():
        pts = kinds.get(fmt.kind(name), [])
        out[name] = {ty: float(c) * factor(pts, fmt.bpw(ty)) for ty, c in row.items()}
    return out


def calibrated(table: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`scaled` for a GGUF sensitivity table."""
    return scaled({n: r["types"] for n, r in table["tensors"].items()}, table.get("probes"))
