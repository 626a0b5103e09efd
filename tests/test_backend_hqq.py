"""HQQ backend and runtime: quantize the tiny model on CPU, reload from safetensors in a fresh
process, and compare with FP16."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from backend_helpers import measure, quantize

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError
from orlik.manifest import Variant
from orlik.quantize.backends import backend_for
from orlik.quantize.recipe import Recipe
from orlik.serving.runtimes.base import runtime_class

# Bounds for the tiny test model (60 training steps, so its outputs move little under any weight
# noise); measured means were ~1e-4 (4-bit) and ~2e-4 (3-bit). A broken layout or runtime gives > 0.1.
KLD_4BIT_MAX = 0.005
KLD_3BIT_MAX = 0.01


@pytest.fixture(scope="module")
def hqq_variants(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hqq")
    return {b: quantize(tiny_checkpoint, f"hqq-{b}bit-g64", root / f"hqq{b}").path for b in (4, 3)}  # type: ignore[misc]


@pytest.fixture(scope="module")
def hqq_measured(tiny_checkpoint: Path, hqq_variants: dict[int, Path]) -> dict[str, dict]:
    return measure(tiny_checkpoint, hqq_variants[4], hqq_variants[3])


def test_manifest_counts_scales_and_zeros(hqq_variants: dict[int, Path], tiny_checkpoint: Path) -> None:
    ckpt = Checkpoint.open(tiny_checkpoint)
    for bits, packed in ((4, 4.0), (3, 3.2)):  # 3-bit packs ten values per 32-bit word
        v = Variant.load(hqq_variants[bits])
        assert v.format == "hqq" and v.calibration_hash is None and v.tools["hqq"].startswith("0.2.8")
        assert not v.verify()
        # FP16 scale + zero per 64 weights add 0.5 bit; the encoded metadata a little more.
        assert packed + 0.5 <= v.extra["quantized_linear_bpw"] <= packed + 0.55
        assert v.bytes < 0.5 * ckpt.weights_bytes
        assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in v.files)


def test_fresh_process_reload_is_close_to_fp16(hqq_measured: dict[str, dict], tiny_checkpoint: Path) -> None:
    fp16 = Checkpoint.open(tiny_checkpoint).weights_bytes
    m4, m3 = hqq_measured["hqq4"], hqq_measured["hqq3"]
    assert m4["kld"] < KLD_4BIT_MAX and m3["kld"] < KLD_3BIT_MAX
    assert m3["kld"] > m4["kld"], "3-bit should lose more than 4-bit"
    assert m4["same_top"] > 0.95
    assert m4["generated"] == 8 and m4["runtime"] == "hqq"
    # Packed weights stay packed: the model holds about its on-disk size, not an FP16 copy.
    assert m4["resident"] < 0.45 * fp16 and m3["resident"] < m4["resident"]


def test_metadata_parses_in_transformers(hqq_variants: dict[int, Path]) -> None:
    from transformers import AutoConfig, HqqConfig

    cfg = AutoConfig.from_pretrained(str(hqq_variants[3]))
    qc = cfg.quantization_config
    assert qc["quant_method"] == "hqq"
    parsed = HqqConfig.from_dict(qc)
    assert parsed.quant_config["weight_quant_params"]["nbits"] == 3
    assert parsed.quant_config["weight_quant_params"]["group_size"] == 64


def test_hqq_linear_reads_the_layout(hqq_variants: dict[int, Path]) -> None:
    """hqq's own HQQLinear.load_state_dict takes one layer's tensors straight from the file."""
    import torch
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file

    state = load_file(str(hqq_variants[4] / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."
    layer = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
    layer.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    w = layer.dequantize()
    assert tuple(w.shape) == (256, 768) and layer.W_q.dtype == torch.uint8
    assert layer.W_q.numel() == 256 * 768 // 2  # two 4-bit values per byte


@pytest.mark.slow
def test_hashes_stable_across_runs(
    tiny_checkpoint: Path, hqq_variants: dict[int, Path], tmp_path: Path
) -> None:
    again = quantize(tiny_checkpoint, "hqq-3bit-g64", tmp_path / "again")
    assert again.files == Variant.load(hqq_variants[3]).files


def test_bad_recipe_and_missing_library(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InputError, match="group size"):
        quantize(tiny_checkpoint, "hqq-4bit-g48", tmp_path / "bad")
    with pytest.raises(InputError, match="bits"):
        quantize(tiny_checkpoint, "hqq-5bit-g64", tmp_path / "bad")
    monkeypatch.setitem(sys.modules, "hqq", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[hqq\]"'):
        backend_for("hqq")
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[hqq\]"'):
        runtime_class("hqq")


def test_unknown_architecture_is_named(checkpoint_copy: Path, tmp_path: Path) -> None:
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["model_type"] = "orlik_unknown"
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="orlik_unknown"):
        backend_for("hqq").quantize(
            Checkpoint.open(checkpoint_copy), Recipe.from_name("hqq-4bit-g64"), None, tmp_path
        )  # type: ignore[arg-type]
