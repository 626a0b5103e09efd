"""Five changes to GPTQModel's AWQ processor that bound its memory, installed for a run. Each is
named in CHANGES and can be turned off alone (an AWQ recipe option of the same name).

1. The weight-clipping search as a batched matrix product. After the scale search, AWQ picks for
   every weight group a clipping bound: it tries ten shrink ratios of the group's max |w| (1, 0.95,
   ... 0.55), pseudo-quantizes the clipped weights, and keeps the ratio whose outputs on a sample of
   ~512 calibration tokens are closest to the unquantized ones. GPTQModel (like AutoAWQ before it)
   computes those outputs as a broadcast `(x[1, tokens, groups, g] * w[rows, 1, groups, g]).sum(-1)`,
   which materialises a rows x tokens x in_features tensor: 738 MiB in FP16 for one 256-row slice
   of a 2,816-wide down_proj. On a small model that is most of the peak memory, and on CPU most of
   the run time. The output error x.q - x.w is x.(q - w), a matrix product per group,
   `x[groups, tokens, g] @ (q - w)[groups, g, rows]`, whose result is only rows x tokens x groups;
   `best_clip` takes it for as many rows at a time as fit in 4 MiB. It is the same search (same
   token sample, same shrink grid, the processor's own pseudo-quantizer, the same per-group mean
   squared error), in float32 rather than with each product rounded to FP16.

2. One copy of each captured input. The processor records every linear's input per calibration
   batch; q/k/v (and gate/up) are fed the very same tensor, but it concatenates the batches once per
   module, so a decoder layer holds three copies of the attention input and two of the MLP input.
   `_shared_layer_input_features` concatenates each distinct input once and hands the same tensor to
   every module that read it; `_apply_scale_once` then divides a shared input by its group's scales
   once, where GPTQModel would divide it once per module (its copies were separate). And it builds
   each concatenation batch by batch, freeing each batch once copied, where GPTQModel holds all
   the batches and their concatenation at once.

3. The per-channel input mean streamed. The scale search averages |x| over the captured input: it
   takes |x| of the whole input at once, then sums it in float32 chunks of up to 1 GiB, so a
   down_proj input of 7,680 tokens x 2,816 costs 41 MiB for |x| and 82 MiB for the float32 copy.
   `_search_best_scale_streamed` takes |x| and its float32 sum `CHUNK_BYTES` of rows at a time, and
   runs the rest of the search (the reference outputs, the grid over the scales) as GPTQModel does.

4. The originals of the weights under the scale search kept in their own dtype. Each candidate
   scaling is applied to the weights in place and undone from a copy; GPTQModel keeps that copy in
   float32, 88 MiB for gate+up of a 2,048 x 5,632 MLP. `_compute_best_scale_exact_copy` runs the same
   grid with an FP16 copy: the same values come back, at half the bytes.

5. The packed layer let go. After packing a linear into the AWQ format, GPTQModel keeps its
   pseudo-quantized FP16 weight in the module's state and on the replaced linear until the looper
   drops the module, one layer later; `_pack_module_releasing` drops both after packing.

With 2-5 on and 1 off, the tiny model's AWQ weights are byte-identical to GPTQModel's (a slow test).

One correction is always installed as well (`awq_chain`): a scaling group whose
input comes from a module left FP16 for its width gets that module as the op its scales fold into.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from orlik.quantize.backends import awq_chain

N_GRID = 20  # ratios step by 1/N_GRID ...
MAX_SHRINK = 0.5  # ... down to (1 - MAX_SHRINK), exclusive: ten candidates
SAMPLE_TOKENS = 512  # calibration tokens the error is measured on (every k-th token)
PRODUCT_BYTES = 4 * 2**20  # output rows per slice: as many as keep [groups, tokens, rows] float32 within it
CHANGES = ("matmul_clip", "shared_features", "streamed_mean", "exact_copy", "release_packed")  # 1-5 above
CHUNK_BYTES = 16 * 2**20  # float32 rows at a time for the input mean
SCALE_GRID = 20  # exponents a = 0, 1/20, ... 19/20 of the scale search


def best_clip(
    w: Any,
    x: Any,
    group_size: int,
    quantize_into: Callable[[Any, Any], None],
    *,
    n_grid: int = N_GRID,
    max_shrink: float = MAX_SHRINK,
    n_sample_token: int = SAMPLE_TOKENS,
    rows: int = 0,
) -> Any:
    """Best clipping bound per output row and weight group: a [out, groups, 1] tensor in w's dtype.

    `w` is a [out, in] weight, `x` the module's calibration inputs (any leading shape, last dim
    `in`), and `quantize_into(src, dst)` writes the pseudo-quantized `src` into `dst` group by group.
    `rows` output rows are searched at a time (0: as many as fit `PRODUCT_BYTES`).
    """
    import torch

    out_features, in_features = w.shape
    group = group_size if group_size > 0 else in_features
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of the group size {group}")
    groups = in_features // group
    with torch.inference_mode():
        x = x.reshape(-1, in_features)
        x = x[:: max(1, x.shape[0] // n_sample_token)]
        tokens = x.shape[0]
        # [groups, tokens, g]: each group's slice of the inputs, as the left operand of a bmm.
        xg = x.to(torch.float32).reshape(tokens, groups, group).transpose(0, 1).contiguous()
        best = torch.empty(out_features, groups, 1, dtype=w.dtype, device=w.device)
        rows = rows or max(1, min(out_features, PRODUCT_BYTES // (4 * groups * tokens)))
        clamped = torch.empty(min(rows, out_features), groups, group, dtype=w.dtype, device=w.device)
        quant = torch.empty_like(clamped)
        for start in range(0, out_features, rows):
            wg = w[start : start + rows].reshape(-1, groups, group)  # [r, groups, g]
            r = wg.shape[0]
            c, q = clamped[:r], quant[:r]
            wf = wg.to(torch.float32)
            org_max = wg.abs().amax(dim=-1, keepdim=True)  # [r, groups, 1]
            best_max = org_max.clone()
            min_err = torch.full((groups, r), float("inf"), dtype=torch.float32, device=w.device)
            for step in range(int(max_shrink * n_grid)):
                max_val = org_max * (1 - step / n_grid)
                torch.clamp(wg, -max_val, max_val, out=c)
                quantize_into(c, q)
                # x.q - x.w, as x.(q - w): one [groups, tokens, r] product per candidate
                delta = q.to(torch.float32).sub_(wf).permute(1, 2, 0)  # [groups, g, r]
                err = torch.bmm(xg, delta).pow_(2).mean(dim=1)  # [groups, r]
                better = err < min_err
                min_err = torch.where(better, err, min_err)
                best_max = torch.where(better.t().unsqueeze(-1), max_val, best_max)
            best[start : start + r] = best_max
    return best


def _processor_clip(self: Any, w: Any, input_feat: Any, n_grid: int = N_GRID, max_shrink: float = MAX_SHRINK,
                    n_sample_token: int = SAMPLE_TOKENS) -> Any:  # fmt: skip
    """Drop-in for AWQProcessor._compute_best_clip (same signature and result layout)."""
    return best_clip(w, input_feat, self.qcfg.group_size, self._pseudo_quantize_tensor_into,
                     n_grid=n_grid, max_shrink=max_shrink, n_sample_token=n_sample_token)  # fmt: skip


def _storage_key(t: Any) -> tuple[Any, ...]:
    """Equal for two live tensors exactly when they are views of the same memory, same layout."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _concat_releasing(batches: list[Any], order: list[int]) -> Any:
    """torch.cat of `batches` in `order` along dim 0, each batch's list slot emptied once it is copied."""
    first = batches[order[0]]
    out = first.new_empty((sum(int(b.shape[0]) for b in batches), *first.shape[1:]))
    first, pos = None, 0  # no reference to batch 0 beyond its list slot
    for k in order:
        batch, batches[k] = batches[k], None
        out[pos : pos + batch.shape[0]].copy_(batch)
        pos += batch.shape[0]
    return out


def _shared_layer_input_features(self: Any, state: Any) -> dict[str, Any]:
    """Drop-in for AWQProcessor._layer_input_features. Modules whose captured batches are the same
    tensors get one concatenation between them, and the same stats and replay kwargs; and a plain
    concatenation (no model-specific aggregation policy, equal shapes) is built batch by batch, each
    batch let go once copied, so that a module's batches and their concatenation are never both
    whole. Other modules (MoE token-row policies, ragged batches) go to GPTQModel's own code."""
    first_by_key: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    held: dict[str, Any] = {}  # entries hidden from the original for the call
    mine: list[str] = []
    for name in list(state.modules):
        entry = self.tasks.get(name) or {}
        inputs = entry.get("inputs") or []
        if not inputs:
            continue
        key = (tuple(_storage_key(t) for t in inputs), tuple(entry.get("batch_indices") or ()))
        if key in first_by_key:
            aliases[name] = first_by_key[key]
            entry["inputs"] = []  # the first module's list is the one left holding the batches
        elif self._feature_aggregation_policy(name) is None and self._can_concat_batch_tensors(inputs):
            first_by_key[key] = name
            mine.append(name)
        else:
            first_by_key[key] = name
            continue
        held[name] = entry
        self.tasks[name] = {"inputs": [], "batch_indices": []}  # the original records it as empty
    try:
        features: dict[str, Any] = _ORIGINAL["_layer_input_features"](self, state)
    finally:
        self.tasks.update(held)
    for name in mine:
        entry = held[name]
        batches, indices = entry["inputs"], list(entry.get("batch_indices") or [])
        order = list(range(len(batches)))
        if len(indices) == len(batches) and all(i is not None and i >= 0 for i in indices):
            order.sort(key=lambda k: int(indices[k]))  # replay order, as the original restores it
            indices = [indices[k] for k in order]
        feature = features[name] = _concat_releasing(batches, order)
        entry["inputs"], entry["batch_indices"] = [feature], [None]
        tokens = int(feature.numel() // max(int(feature.shape[-1]), 1))
        self._awq_feature_kwargs[name] = self._feature_kwargs_from_batch_indices(indices)
        self._feature_stats[name] = {"mode": "batch", "raw_tokens": tokens, "retained_tokens": tokens,
                                     "batches": len(batches)}  # fmt: skip
    for name, first in aliases.items():
        features[name] = features[first]
        held[name]["inputs"] = [features[first]]
        held[name]["batch_indices"] = list(self.tasks[first].get("batch_indices", [None]))
        self._feature_stats[name] = dict(self._feature_stats.get(first, {}))
        self._awq_feature_kwargs[name] = self._awq_feature_kwargs.get(first, {})
    return features


def _apply_scale_once(
    module: Any, scales_list: list[Any], input_feat_dict: dict[str, Any] | None = None
) -> None:
    """Drop-in for gptqmodel's apply_scale as the AWQ processor calls it: a tensor shared by several
    modules is divided by their group's scales once. Modules that share an input share its previous
    op and so its scaling group; if they ever do not, they get copies of their own first."""
    if input_feat_dict:
        group_of = {n: i for i, (_, layer_names, *_) in enumerate(scales_list) for n in layer_names}
        by_tensor: dict[int, list[str]] = {}
        for name, t in input_feat_dict.items():
            by_tensor.setdefault(id(t), []).append(name)
        view = dict(input_feat_dict)
        for names in by_tensor.values():
            if len(names) < 2:
                continue
            if len({group_of.get(n) for n in names}) == 1:
                for n in names[1:]:
                    del view[n]
            else:
                for n in names[1:]:
                    input_feat_dict[n] = view[n] = input_feat_dict[n].clone()
        input_feat_dict = view
    _ORIGINAL["apply_scale"](module, scales_list, input_feat_dict=input_feat_dict)


def abs_mean(x: Any, chunk_bytes: int = CHUNK_BYTES) -> Any:
    """Mean of |x| over every axis but the last, summed in float32 `chunk_bytes` of rows at a time;
    in x's dtype. (GPTQModel's sum, chunk for chunk, without its full-size |x|.)"""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    step = max(1, chunk_bytes // (4 * flat.shape[1]))
    total = torch.zeros(flat.shape[1], dtype=torch.float32, device=x.device)
    for i in range(0, flat.shape[0], step):
        total += flat[i : i + step].abs().to(torch.float32).sum(dim=0)
    return (total / flat.shape[0]).to(x.dtype)


def _search_best_scale_streamed(self: Any, module: Any, prev_op: Any, layers: list[Any], inp: Any,
                                module2inspect: Any = None, kwargs: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """Drop-in for AWQProcessor._search_best_scale (its default, chunked path): the same steps, with
    the input mean from `abs_mean`. Returns (prev op name, layer names, best scales, loss)."""
    if not getattr(self.qcfg, "scale_search_chunked_activations", True):
        return _ORIGINAL["_search_best_scale"](
            self, module, prev_op, layers, inp, module2inspect, kwargs or {}
        )
    import torch
    from gptqmodel.looper import awq_processor

    if module2inspect is None:
        if len(layers) != 1:
            raise ValueError(f"AWQ scale group of {len(layers)} layers needs the module that runs them")
        module2inspect = layers[0]
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "use_cache"}
    w_mean = awq_processor._compute_awq_weight_mean(layers, self.qcfg.group_size)
    x_mean = abs_mean(inp)
    module_kwargs = self._sanitize_kwargs(kwargs, module2inspect)
    for key, value in self._sanitize_kwargs(
        getattr(self, "_module_forward_kwargs", {}), module2inspect
    ).items():
        module_kwargs.setdefault(key, value)
    module_kwargs = self._align_module_kwargs_to_input(inp, module_kwargs)
    with torch.inference_mode():  # the unquantized outputs, one micro-batch at a time, kept on CPU
        reference = []
        for out in self._iter_module_forward_outputs(inp, module2inspect, module_kwargs):
            info = torch.finfo(out.dtype)
            reference.append(out.clip(info.min, info.max).detach().cpu())
    scales, loss = self._compute_best_scale(
        inp, w_mean, x_mean, module2inspect, layers, reference, module_kwargs
    )
    name = awq_processor.get_op_name
    return name(module, prev_op), tuple(name(module, m) for m in layers), scales, loss


def _compute_best_scale_exact_copy(self: Any, x: Any, w_mean: Any, x_mean: Any, module2inspect: Any,
                                   linears2scale: list[Any], fp16_output: Any, kwargs: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """Drop-in for AWQProcessor._compute_best_scale (its default, chunked path): the same grid of 20
    scalings s = x_mean^a / w_mean^(1-a), each pseudo-quantized in place and scored by the mean
    squared error of the module's output against `fp16_output`; but the weights are restored from a
    copy in their own dtype, where GPTQModel keeps float32 copies of them (twice the bytes, and the
    same values back). Returns (best scales on CPU, their loss)."""
    if not getattr(self.qcfg, "scale_search_chunked_activations", True):
        return _ORIGINAL["_compute_best_scale"](self, x, w_mean, x_mean, module2inspect, linears2scale,
                                                fp16_output, kwargs or {})  # fmt: skip
    import torch

    kwargs = kwargs or {}
    params = list(module2inspect.parameters())
    device = params[0].device if params else x.device
    x_mean, w_mean = x_mean.view(-1).to(device), w_mean.view(-1).to(device)
    prev_scale = getattr(self._scale_context, "prev_scale", None)
    if prev_scale is not None:
        w_mean = w_mean * float(prev_scale)
    originals = [(fc, fc.weight.detach().clone()) for fc in linears2scale]
    best_error, best_scales = float("inf"), None
    try:
        for step in range(SCALE_GRID):
            ratio = step / SCALE_GRID
            if self.duo_scaling:
                scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            else:
                scales = x_mean.pow(ratio).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales[torch.isinf(scales) | torch.isnan(scales)] = 1
            row = scales.view(1, -1)
            for fc, _ in originals:
                fc.weight.mul_(row)
                self._pseudo_quantize_tensor_into(fc.weight, fc.weight)
                fc.weight.div_(row)
            total, count = 0.0, 0
            outputs = self._iter_module_forward_outputs(x, module2inspect, kwargs)
            for ref, out in zip(self._iter_reference_output_chunks(x, fp16_output), outputs, strict=True):
                info = torch.finfo(out.dtype)
                out = out.clip(info.min, info.max)
                diff = (ref.to(device=out.device, dtype=out.dtype) - out).float()
                total += diff.pow(2).sum().item()
                count += diff.numel()
            loss = total / max(count, 1)
            if loss < best_error:
                best_error, best_scales = loss, scales.clone()
            for fc, original in originals:
                fc.weight.copy_(original)
    finally:
        for fc, original in originals:
            fc.weight.copy_(original)
    if best_scales is None or torch.isnan(best_scales).any():
        raise ValueError(f"AWQ scale search found no finite loss for {type(module2inspect).__name__}")
    return best_scales.detach().cpu(), best_error


def _pack_module_releasing(self: Any, module: Any) -> None:
    """AWQProcessor.pack_module, then the pseudo-quantized FP16 weight it packed is let go: the
    processor keeps it in the module's state, and the replaced linear still points at it, until the
    looper drops the module one layer later."""
    _ORIGINAL["pack_module"](self, module)
    module.state.pop("wq", None)
    linear = getattr(module, "module", None)
    weight = getattr(linear, "weight", None)
    if weight is None or self.gptq_model.model.get_submodule(module.full_name) is linear:
        return  # not replaced by a packed module: its weight is still the model's
    import torch

    # A meta tensor in its place: shape and dtype stay readable, the values are gone.
    meta = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
    linear.register_parameter("weight", torch.nn.Parameter(meta, requires_grad=False))


_ORIGINAL: dict[str, Any] = {}


@contextlib.contextmanager
def installed(
    *,
    matmul_clip: bool = True,
    shared_features: bool = True,
    streamed_mean: bool = True,
    exact_copy: bool = True,
    release_packed: bool = True,
) -> Iterator[None]:
    """GPTQModel's AWQ processor runs with the chosen changes inside the block, as shipped after."""
    from gptqmodel.looper import awq_processor

    cls = awq_processor.AWQProcessor
    chosen = {"matmul_clip": [(cls, "_compute_best_clip", _processor_clip)],
              "shared_features": [(cls, "_layer_input_features", _shared_layer_input_features),
                                  (awq_processor, "apply_scale", _apply_scale_once)],
              "streamed_mean": [(cls, "_search_best_scale", _search_best_scale_streamed)],
              "exact_copy": [(cls, "_compute_best_scale", _compute_best_scale_exact_copy)],
              "release_packed": [(cls, "pack_module", _pack_module_releasing)]}  # fmt: skip
    on = {"matmul_clip": matmul_clip, "shared_features": shared_features, "streamed_mean": streamed_mean,
          "exact_copy": exact_copy, "release_packed": release_packed}  # fmt: skip
    from gptqmodel.models.base import BaseQModel

    fix = (
        BaseQModel,
        "awq_get_modules_for_scaling",
        awq_chain.wrap(BaseQModel.__dict__["awq_get_modules_for_scaling"]),
    )
    saved = [(owner, name, owner.__dict__[name]) for patches in chosen.values() for owner, name, _ in patches]
    saved.append((fix[0], fix[1], BaseQModel.__dict__[fix[1]]))
    _ORIGINAL.update((name, fn) for _, name, fn in saved)
    for change, patches in chosen.items():
        for owner, name, fn in patches:
            if on[change]:
                setattr(owner, name, fn)
    setattr(*fix)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
