"""AWQ's clipping search as a matrix product (quantize/backends/awq_lean.py): it must choose, for
every row and weight group, the shrink ratio with the least reconstruction error, as a float64
search by the broadcast definition does; and it must agree with GPTQModel's own search. (That one
shared input copy, the streamed input mean and the FP16 weight copies change no weight is checked
end to end in test_backend_awq.py.)"""

from __future__ import annotations

import types

import pytest
import torch

from orlik.quantize.backends import awq_lean


def asym4_into(src: torch.Tensor, dst: torch.Tensor, group: int) -> None:
    """4-bit asymmetric round-to-nearest per group of `group` values (AWQ's pseudo-quantizer)."""
    s, d = src.reshape(-1, group), dst.view(-1, group)
    hi, lo = s.amax(1, keepdim=True), s.amin(1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-5) / 15
    zero = (-torch.round(lo / scale)).clamp(0, 15)
    d.copy_((torch.clamp(torch.round(s / scale) + zero, 0, 15) - zero) * scale)


def errors_by_definition(w: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
    """[ratios, out, groups] mean squared output error of each candidate, in float64, by the
    broadcast definition: sum over a group's inputs of x * clip-quantized w, every k-th token."""
    x = x.reshape(-1, w.shape[1])
    x = x[:: max(1, x.shape[0] // awq_lean.SAMPLE_TOKENS)].double()
    xg = x.reshape(1, x.shape[0], -1, group)  # [1, tokens, groups, g]
    wg = w.reshape(w.shape[0], 1, -1, group)  # [out, 1, groups, g]
    ref = (xg * wg.double()).sum(-1)  # [out, tokens, groups]
    org_max = wg.abs().amax(-1, keepdim=True)
    errs = []
    for step in range(int(awq_lean.MAX_SHRINK * awq_lean.N_GRID)):
        m = org_max * (1 - step / awq_lean.N_GRID)
        q = torch.empty_like(wg)
        asym4_into(torch.clamp(wg, -m, m), q, group)
        errs.append(((xg * q.double()).sum(-1) - ref).pow(2).mean(1))  # [out, groups]
    return torch.stack(errs)


@pytest.mark.parametrize(
    ("out", "inp", "group", "tokens"),
    [(200, 256, 64, 900), (96, 384, 128, 2000), (70, 128, -1, 300)],  # rows not a multiple of 64; per-channel
)
def test_choice_is_the_least_error_candidate(out: int, inp: int, group: int, tokens: int) -> None:
    torch.manual_seed(0)
    w = (torch.randn(out, inp) * 0.02).to(torch.float16)
    w[::7, :5] *= 30  # outliers, so that clipping pays off for some groups and not others
    x = torch.randn(tokens, inp).to(torch.float16)
    g = group if group > 0 else inp
    best = awq_lean.best_clip(w, x, group, lambda s, d: asym4_into(s, d, g))
    assert best.shape == (out, inp // g, 1) and best.dtype == w.dtype

    errs = errors_by_definition(w, x, g)  # [ratios, out, groups]
    org_max = w.reshape(out, -1, g).abs().amax(-1).double()
    ratio = best.squeeze(-1).double() / org_max
    steps = torch.round((1 - ratio) * awq_lean.N_GRID).long().clamp(0, errs.shape[0] - 1)
    chosen = errs.gather(0, steps.unsqueeze(0))[0]
    least = errs.min(0).values
    # float32 sums against float64: a near tie may go either way, within rounding of the error
    assert torch.all(chosen <= least * (1 + 1e-4) + 1e-12)
    assert (steps > 0).any() and (steps == 0).any(), (
        "the data should make both clipping and none win somewhere"
    )


def test_row_slicing_does_not_change_the_result() -> None:
    torch.manual_seed(1)
    w = (torch.randn(300, 256) * 0.02).to(torch.float16)
    x = torch.randn(2, 400, 256).to(torch.float16)
    q = lambda s, d: asym4_into(s, d, 128)  # noqa: E731
    assert torch.equal(awq_lean.best_clip(w, x, 128, q, rows=37), awq_lean.best_clip(w, x, 128, q, rows=4096))


def test_abs_mean_streams_in_float32_chunks() -> None:
    torch.manual_seed(3)
    x = (torch.randn(5, 300, 96) * torch.linspace(0.1, 30, 96)).to(torch.float16)
    exact = x.double().abs().reshape(-1, 96).mean(0)
    # 96 float32 columns are 384 bytes a row: chunks of 7 rows, 215 of them, and one chunk
    for chunk in (7 * 384, 2**30):
        got = awq_lean.abs_mean(x, chunk_bytes=chunk)
        assert got.dtype == torch.float16 and got.shape == (96,)
        assert torch.allclose(got.double(), exact, rtol=1e-3, atol=0)


def test_group_must_divide_the_input_width() -> None:
    w, x = torch.zeros(8, 100, dtype=torch.float16), torch.zeros(4, 100, dtype=torch.float16)
    with pytest.raises(ValueError, match="not a multiple of the group size 64"):
        awq_lean.best_clip(w, x, 64, lambda s, d: None)


def test_agrees_with_gptqmodel_and_is_installed_only_inside_the_block() -> None:
    pytest.importorskip("gptqmodel", reason='GPTQModel is not installed (pip install "orlik[awq]")')
    from gptqmodel.looper import awq_processor
    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor.__dict__["_compute_best_clip"]
    features, apply_scale = AWQProcessor.__dict__["_layer_input_features"], awq_processor.apply_scale
    search, grid = AWQProcessor.__dict__["_search_best_scale"], AWQProcessor.__dict__["_compute_best_scale"]
    pack = AWQProcessor.__dict__["pack_module"]
    torch.manual_seed(2)
    w = (torch.randn(256, 512) * 0.02).to(torch.float16)
    w[::5, :9] *= 25
    x = torch.randn(4, 256, 512).to(torch.float16)
    proc = types.SimpleNamespace(qcfg=types.SimpleNamespace(group_size=128, bits=4, sym=False))
    proc._pseudo_quantize_tensor_into = types.MethodType(AWQProcessor._pseudo_quantize_tensor_into, proc)
    theirs = original(proc, w, x)
    with awq_lean.installed():
        assert AWQProcessor.__dict__["_compute_best_clip"] is awq_lean._processor_clip
        assert awq_processor.apply_scale is awq_lean._apply_scale_once
        assert AWQProcessor.__dict__["_search_best_scale"] is awq_lean._search_best_scale_streamed
        assert AWQProcessor.__dict__["_compute_best_scale"] is awq_lean._compute_best_scale_exact_copy
        assert AWQProcessor.__dict__["pack_module"] is awq_lean._pack_module_releasing
        ours = AWQProcessor._compute_best_clip(proc, w, x)
    assert AWQProcessor.__dict__["_compute_best_clip"] is original
    assert (
        AWQProcessor.__dict__["_layer_input_features"] is features
        and awq_processor.apply_scale is apply_scale
        and AWQProcessor.__dict__["_search_best_scale"] is search
        and AWQProcessor.__dict__["_compute_best_scale"] is grid
        and AWQProcessor.__dict__["pack_module"] is pack
    )
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    # GPTQModel rounds each product to FP16 before summing, so a near tie can differ.
    assert (ours == theirs).float().mean() > 0.98
