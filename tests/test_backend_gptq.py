"""GPTQ backend (GPTQModel on CPU) and the transformers runtime: standard GPTQ checkpoints of the tiny
model, reloaded from disk in a fresh process and compared with FP16. Quantizing is slow on 2 cores,
so those tests are marked slow; the checks that need no quantization run by default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from backend_helpers import measure, quantize

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, MissingDependencyError
from orlik.manifest import Variant
from orlik.quantize.backends import Backend, backend_for
from orlik.quantize.recipe import Recipe
from orlik.serving.runtimes.base import runtime_class

# A short calibration keeps the test within a minute per variant on 2 cores.
CALIB = {"calib_samples": 16, "calib_seq_len": 128}
# Tiny test model (60 training steps, outputs move little): measured means ~1e-4 (4-bit), ~5e-4 (3-bit).
KLD_4BIT_MAX = 0.005
KLD_3BIT_MAX = 0.02


@pytest.fixture(scope="module")
def gptq_variants(
    tiny_checkpoint: Path, tiny_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    pytest.importorskip("gptqmodel", reason='GPTQModel is not installed (pip install "orlik[gptq]")')
    root = tmp_path_factory.mktemp("gptq")
    names = ("gptq-w4g128", "gptq-w3g128")
    return {n: quantize(tiny_checkpoint, n, root / n, tiny_calibration, **CALIB).path for n in names}  # type: ignore[misc]


@pytest.mark.slow
def test_standard_gptq_checkpoint(gptq_variants: dict[str, Path], tiny_calibration: Path) -> None:
    from transformers import AutoConfig, GPTQConfig

    v = Variant.load(gptq_variants["gptq-w4g128"])
    assert v.format == "gptq" and not v.verify() and v.tools["gptqmodel"] == "7.6.0"
    assert v.calibration_hash and len(v.calibration_hash) == 64
    # 4 bits + an FP16 scale per 128 weights (0.125) + packed 4-bit zeros (0.03) + g_idx (32 bits per input column).
    assert 4.15 <= v.extra["quantized_linear_bpw"] <= 4.3
    assert not (gptq_variants["gptq-w4g128"] / "quant_log.csv").exists()
    cfg = AutoConfig.from_pretrained(str(gptq_variants["gptq-w4g128"]))
    parsed = GPTQConfig.from_dict(cfg.quantization_config)
    assert cfg.quantization_config["quant_method"] == "gptq" and parsed.bits == 4 and parsed.group_size == 128
    from safetensors import safe_open

    with safe_open(str(gptq_variants["gptq-w4g128"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for t in ("qweight", "qzeros", "scales", "g_idx"):
        assert f"model.layers.0.self_attn.q_proj.{t}" in keys


@pytest.mark.slow
def test_fresh_process_reload_is_close_to_fp16(gptq_variants: dict[str, Path], tiny_checkpoint: Path) -> None:
    m = measure(tiny_checkpoint, gptq_variants["gptq-w4g128"], gptq_variants["gptq-w3g128"])
    q4, q3 = m["gptq-w4g128"], m["gptq-w3g128"]
    assert q4["kld"] < KLD_4BIT_MAX and q3["kld"] < KLD_3BIT_MAX
    assert q3["kld"] > q4["kld"]
    assert q4["same_top"] > 0.95 and q4["generated"] == 8
    assert q4["resident"] < 0.45 * Checkpoint.open(tiny_checkpoint).weights_bytes  # packed in memory


@pytest.mark.slow
def test_hashes_stable_across_runs(gptq_variants: dict[str, Path], tiny_checkpoint: Path, tiny_calibration: Path,
                                   tmp_path: Path) -> None:  # fmt: skip
    again = quantize(tiny_checkpoint, "gptq-w4g128", tmp_path / "again", tiny_calibration, **CALIB)
    assert again.files == Variant.load(gptq_variants["gptq-w4g128"]).files


def test_recipe_options_and_errors(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Recipe.from_name("gptq-w4g128-act").options == {"act_order": True}
    assert Recipe.from_name("gptq-w4").group_size is None  # per-channel
    from orlik.quantize.backends import Calibration

    with pytest.raises(InputError, match="calibration"):
        backend_for_or_skip("gptq").quantize(Checkpoint.open(tiny_checkpoint), Recipe.from_name("gptq-w4g128"),
                                             Calibration(), tmp_path)  # fmt: skip
    with pytest.raises(InputError, match="bits"):
        backend_for_or_skip("gptq").quantize(Checkpoint.open(tiny_checkpoint), Recipe.from_name("gptq-w5g128"),
                                             Calibration(), tmp_path)  # fmt: skip
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[gptq\]"'):
        backend_for("gptq")
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[gptq\]"'):
        runtime_class("gptq")


@pytest.mark.slow
def test_unknown_architecture_is_named(checkpoint_copy: Path, tiny_calibration: Path, tmp_path: Path) -> None:
    from orlik.quantize.backends import Calibration

    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["model_type"] = "orlik_unknown"
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="orlik_unknown"):
        backend_for_or_skip("gptq").quantize(Checkpoint.open(checkpoint_copy), Recipe.from_name("gptq-w4g128"),
                                             Calibration(jsonl=tiny_calibration / "calibration.jsonl"), tmp_path)  # fmt: skip


def backend_for_or_skip(fmt: str) -> Backend:
    try:
        return backend_for(fmt)
    except MissingDependencyError as e:
        pytest.skip(str(e))


_HARD_STOP = r"""
import sys
from pathlib import Path
from gptqmodel.utils import threadx
from orlik.quantize.backends.gptqmodel_driver import _hard_stop_said

with _hard_stop_said("gptq-w4g128", Path(sys.argv[1])):
    try:
        raise RuntimeError("The size of tensor a (320) must match the size of tensor b (768)\nmore detail")
    except RuntimeError as exc:
        threadx._DeviceWorker._abort_process(None, exc)
print("not reached")
"""


def test_gptqmodel_hard_stop_errors_in_one_line(tmp_path: Path) -> None:
    """GPTQModel's worker threads end the process with os._exit(1) on any error; orlik's guard turns
    its terminal traceback into one line naming the error and the log, and keeps the traceback."""
    import subprocess

    pytest.importorskip("gptqmodel", reason='GPTQModel is not installed (make test-gptq, or "orlik[gptq]")')
    log = tmp_path / "gptq-w4g128.log"
    p = subprocess.run(
        [sys.executable, "-c", _HARD_STOP, str(log)], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 1 and "not reached" not in p.stdout
    assert p.stderr.splitlines()[-1] == (
        "orlik: error: gptq-w4g128: GPTQModel stopped the process: The size of tensor a (320) must match the "
        f"size of tensor b (768) (details: {log})"
    )
    assert "Traceback" not in p.stderr and "more detail" in log.read_text(encoding="utf-8")
