"""AWQ's weight-clipping search as a batched matrix product, installed on GPTQModel for a run.

After the scale search, AWQ picks for every weight group a clipping bound: it tries ten shrink
ratios of the group's max |w| (1, 0.95, ... 0.55), pseudo-quantizes the clipped weights, and keeps
the ratio whose outputs on a sample of ~512 calibration tokens are closest to the unquantized ones.

GPTQModel (like AutoAWQ before it) computes those outputs as a broadcast product
`(x[1, tokens, groups, g] * w[rows, 1, groups, g]).sum(-1)`, which materialises a
rows x tokens x in_features tensor: 738 MiB in FP16 for one 256-row slice of a 2,816-wide
down_proj. On a small model that is most of the peak memory, and on CPU most of the run time.
The same sums are a matrix product per group, `x[groups, tokens, g] @ w[groups, g, rows]`, whose
result is only rows x tokens x groups. This module runs the identical search (same token sample,
same shrink grid, the processor's own pseudo-quantizer, same per-group mean squared error) that way,
in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

N_GRID = 20  # ratios step by 1/N_GRID ...
MAX_SHRINK = 0.5  # ... down to (1 - MAX_SHRINK), exclusive: ten candidates
SAMPLE_TOKENS = 512  # calibration tokens the error is measured on (every k-th token)
ROWS = 256  # output rows per slice: bounds the [groups, tokens, rows] float32 products


def best_clip(
    w: Any,
    x: Any,
    group_size: int,
    quantize_into: Callable[[Any, Any], None],
    *,
    n_grid: int = N_GRID,
    max_shrink: float = MAX_SHRINK,
    n_sample_token: int = SAMPLE_TOKENS,
    rows: int = ROWS,
) -> Any:
    """Best clipping bound per output row and weight group: a [out, groups, 1] tensor in w's dtype.

    `w` is a [out, in] weight, `x` the module's calibration inputs (any leading shape, last dim
    `in`), and `quantize_into(src, dst)` writes the pseudo-quantized `src` into `dst` group by group.
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
        clamped = torch.empty(min(rows, out_features), groups, group, dtype=w.dtype, device=w.device)
        quant = torch.empty_like(clamped)
        for start in range(0, out_features, rows):
            wg = w[start : start + rows].reshape(-1, groups, group)  # [r, groups, g]
            r = wg.shape[0]
            c, q = clamped[:r], quant[:r]
            org_max = wg.abs().amax(dim=-1, keepdim=True)  # [r, groups, 1]
            reference = torch.bmm(xg, wg.to(torch.float32).permute(1, 2, 0))  # [groups, tokens, r]
            best_max = org_max.clone()
            min_err = torch.full((groups, r), float("inf"), dtype=torch.float32, device=w.device)
            for step in range(int(max_shrink * n_grid)):
                max_val = org_max * (1 - step / n_grid)
                torch.clamp(wg, -max_val, max_val, out=c)
                quantize_into(c, q)
                out = torch.bmm(xg, q.to(torch.float32).permute(1, 2, 0))
                err = out.sub_(reference).pow_(2).mean(dim=1)  # [groups, r]
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


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """GPTQModel's AWQ processor uses `best_clip` inside the block, and its own search after."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor.__dict__["_compute_best_clip"]
    AWQProcessor._compute_best_clip = _processor_clip
    try:
        yield
    finally:
        AWQProcessor._compute_best_clip = original
