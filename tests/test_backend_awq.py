"""AWQ backend (GPTQModel's activation-aware scale search, on CPU) and the transformers runtime:
standard AWQ GEMM checkpoints of the tiny model, reloaded in a fresh process and compared with FP16.
Quantizing is slow on 2 cores, so those tests are marked slow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from backend_helpers import measure, quantize

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError
from orlik.manifest import Variant
from orlik.quantize.backends import Calibration, backend_for
from orlik.quantize.recipe import Recipe
from orlik.serving.runtimes.base import runtime_class

CALIB = {"calib_samples": 16, "calib_seq_len": 128}
# Tiny test model (60 training steps): measured mean ~1e-4 at g128.
KLD_MAX = 0.005


@pytest.fixture(scope="module")
def awq_variants(
    tiny_checkpoint: Path, tiny_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    pytest.importorskip("gptqmodel", reason='GPTQModel is not installed (pip install "orlik[awq]")')
    root = tmp_path_factory.mktemp("awq")
    names = ("awq-w4g128", "awq-w4g64")
    return {n: quantize(tiny_checkpoint, n, root / n, tiny_calibration, **CALIB).path for n in names}  # type: ignore[misc]


@pytest.mark.slow
def test_standard_awq_checkpoint(awq_variants: dict[str, Path]) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AwqConfig

    v = Variant.load(awq_variants["awq-w4g128"])
    assert v.format == "awq" and not v.verify() and v.calibration_hash
    # 4 bits + FP16 scale (0.125) + packed 4-bit zero point (0.031) per 128 weights.
    assert v.extra["quantized_linear_bpw"] == pytest.approx(4.156, abs=0.01)
    cfg = AutoConfig.from_pretrained(str(awq_variants["awq-w4g128"]))
    q = cfg.quantization_config
    assert q["quant_method"] == "awq" and q["version"] == "gemm" and q["zero_point"] is True
    assert AwqConfig.from_dict(q).group_size == 128
    with safe_open(str(awq_variants["awq-w4g128"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.mlp.up_proj." + t for t in ("qweight", "qzeros", "scales")} <= keys


@pytest.mark.slow
def test_fresh_process_reload_is_close_to_fp16(awq_variants: dict[str, Path], tiny_checkpoint: Path) -> None:
    m = measure(tiny_checkpoint, awq_variants["awq-w4g128"], awq_variants["awq-w4g64"])
    g128, g64 = m["awq-w4g128"], m["awq-w4g64"]
    # The AWQ GEMM format is 4-bit only, so there is no 3-bit variant to rank against; and on this
    # barely trained model g64 is not reliably closer than g128 (measured 6.7e-5 vs 3.2e-5), so
    # both are only held to the bound.
    assert 0 < g128["kld"] < KLD_MAX and 0 < g64["kld"] < KLD_MAX
    assert g128["same_top"] > 0.95 and g128["generated"] == 8
    assert g128["resident"] < 0.45 * Checkpoint.open(tiny_checkpoint).weights_bytes


@pytest.mark.slow
def test_hashes_stable_across_runs(awq_variants: dict[str, Path], tiny_checkpoint: Path, tiny_calibration: Path,
                                   tmp_path: Path) -> None:  # fmt: skip
    again = quantize(tiny_checkpoint, "awq-w4g128", tmp_path / "again", tiny_calibration, **CALIB)
    assert again.files == Variant.load(awq_variants["awq-w4g128"]).files


@pytest.mark.slow
def test_lean_scale_search_changes_no_weight(
    awq_variants: dict[str, Path], tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path
) -> None:
    # awq_lean hands q/k/v (and gate/up) one concatenated input and divides it by the group's scales
    # once, takes the input mean chunk by chunk (one chunk at this size), restores weights from FP16
    # copies, and frees packed weights early; GPTQModel's own copies, each divided once, its
    # one-piece mean and its float32 copies must give the same bytes.
    own = quantize(tiny_checkpoint, "awq-w4g128", tmp_path / "own", tiny_calibration,
                   shared_features=False, streamed_mean=False, exact_copy=False, release_packed=False,
                   **CALIB)  # fmt: skip
    assert own.files == Variant.load(awq_variants["awq-w4g128"]).files


def test_recipe_errors_and_missing_library(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        backend = backend_for("awq")
    except MissingDependencyError as e:
        pytest.skip(str(e))
    with pytest.raises(InputError, match="4-bit"):
        backend.quantize(
            Checkpoint.open(tiny_checkpoint), Recipe.from_name("awq-w3g128"), Calibration(), tmp_path
        )
    with pytest.raises(InputError, match="group size"):
        backend.quantize(
            Checkpoint.open(tiny_checkpoint), Recipe.from_name("awq-w4g256"), Calibration(), tmp_path
        )
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[awq\]"'):
        backend_for("awq")
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[gptq\]"'):
        runtime_class("awq")
