"""MLX backend and runtime (mlx-cpu on Linux): mlx-lm's conversion with mixed-precision predicates,
reloaded from disk in a fresh process and compared with FP16."""

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

pytest.importorskip("mlx_lm", reason='mlx-lm is not installed (pip install "orlik[mlx]")')

# Tiny test model (60 training steps): measured means ~2e-4 (4-bit) and ~1e-3 (3-bit).
KLD_4BIT_MAX = 0.005
KLD_3BIT_MAX = 0.02


@pytest.fixture(scope="module")
def mlx_variants(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlx")
    names = ("mlx-q4", "mlx-q3", "mlx-q4-h6")
    return {n: quantize(tiny_checkpoint, n, root / n).path for n in names}  # type: ignore[misc]


def test_bpw_counts_scales_and_biases(mlx_variants: dict[str, Path], tiny_checkpoint: Path) -> None:
    q4, q3, mixed = (Variant.load(mlx_variants[n]) for n in ("mlx-q4", "mlx-q3", "mlx-q4-h6"))
    # affine, group 64: a 16-bit scale and a 16-bit bias per 64 weights = +0.5 bit; every matrix,
    # embeddings and head included, is quantized by default, so the whole model is close to that.
    assert q4.extra["quantized_linear_bpw"] == pytest.approx(4.5, abs=0.01)
    assert q3.extra["quantized_linear_bpw"] == pytest.approx(3.5, abs=0.01)
    assert q4.bpw == pytest.approx(4.5, abs=0.05) and q3.bpw < q4.bpw < mixed.bpw < 6.5
    assert not q4.verify() and q4.tools["mlx-lm"] == "0.32.2"
    cfg = json.loads((mlx_variants["mlx-q4-h6"] / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["lm_head"]["bits"] == 6
    assert cfg["quantization"]["model.embed_tokens"]["bits"] == 6


def test_fresh_process_reload_is_close_to_fp16(mlx_variants: dict[str, Path], tiny_checkpoint: Path) -> None:
    m = measure(tiny_checkpoint, mlx_variants["mlx-q4"], mlx_variants["mlx-q3"], mlx_variants["mlx-q4-h6"])
    q4, q3, mixed = m["mlx-q4"], m["mlx-q3"], m["mlx-q4-h6"]
    assert q4["kld"] < KLD_4BIT_MAX and q3["kld"] < KLD_3BIT_MAX
    assert q3["kld"] > q4["kld"] > mixed["kld"], "fewer bits must lose more; 6-bit head and embeddings less"
    assert q4["same_top"] > 0.95 and q4["generated"] == 8 and q4["runtime"] == "mlx-lm"
    fp16 = Checkpoint.open(tiny_checkpoint).weights_bytes
    assert q4["resident"] < 0.4 * fp16  # still packed in memory


def test_mlx_lm_loads_and_generates(mlx_variants: dict[str, Path]) -> None:
    """The variant is a standard mlx-lm directory: mlx_lm.load and mlx_lm.generate take it as is."""
    from mlx_lm import generate, load

    model, tok = load(str(mlx_variants["mlx-q4-h6"]))
    text = generate(model, tok, prompt="Warszawa", max_tokens=5, verbose=False)
    assert isinstance(text, str) and len(tok.encode(text, add_special_tokens=False)) >= 1


def test_hashes_stable_across_runs(
    tiny_checkpoint: Path, mlx_variants: dict[str, Path], tmp_path: Path
) -> None:
    again = quantize(tiny_checkpoint, "mlx-q3", tmp_path / "again")
    assert again.files == Variant.load(mlx_variants["mlx-q3"]).files


def test_overrides_keep_or_requantize_layers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import dataclasses

    from orlik.quantize.backends import Calibration

    recipe = dataclasses.replace(
        Recipe.from_name("mlx-q4-g32"), overrides=(("lm_head", "f16"), ("*.mlp.*", "8g64"))
    )
    out = tmp_path / "mixed"
    out.mkdir()
    backend_for("mlx").quantize(Checkpoint.open(tiny_checkpoint), recipe, Calibration(), out)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["group_size"] == 32 and "lm_head" not in q
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "lm_head.scales" not in keys  # kept in FP16
    assert q["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": 64}
    bad = dataclasses.replace(recipe, overrides=(("lm_head", "q7"),))
    with pytest.raises(InputError, match="q7"):
        backend_for("mlx").quantize(Checkpoint.open(tiny_checkpoint), bad, Calibration(), tmp_path / "x")


def test_errors(checkpoint_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orlik.quantize.backends import Calibration

    with pytest.raises(InputError, match="group size"):
        backend_for("mlx").quantize(
            Checkpoint.open(checkpoint_copy), Recipe.from_name("mlx-q4-g48"), Calibration(), tmp_path
        )
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["model_type"] = "orlik_unknown"
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="orlik_unknown"):
        backend_for("mlx").quantize(
            Checkpoint.open(checkpoint_copy), Recipe.from_name("mlx-q4"), Calibration(), tmp_path
        )
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[mlx\]"'):
        backend_for("mlx")
    with pytest.raises(MissingDependencyError, match=r'pip install "orlik\[mlx\]"'):
        runtime_class("mlx")


@pytest.mark.slow
def test_mlx_awq_on_orlik_calibration(tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path) -> None:
    """mlx-lm's AWQ, fed orlik's calibration set (its own command would download text)."""
    v = quantize(
        tiny_checkpoint, "mlx-q4-awq", tmp_path / "awq", tiny_calibration, calib_samples=8, calib_seq_len=128
    )
    assert v.calibration_hash and v.extra["method"] == "awq"
    q = json.loads((v.path / "config.json").read_text())["quantization"]  # type: ignore[operator]
    assert q["model.layers.0.mlp.down_proj"]["bits"] == 4 and q["model.embed_tokens"]["bits"] == 6
    m = measure(tiny_checkpoint, v.path)  # type: ignore[arg-type]
    assert m["awq"]["kld"] < KLD_4BIT_MAX and m["awq"]["generated"] == 8


def test_bench_scores_an_mlx_variant_like_any_other(
    mlx_variants: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`orlik bench` runs the MLX variant through the same evaluator path as GGUF (logits_from)."""
    from orlik import corpus
    from orlik.cli import main

    text = tmp_path / "pl.txt"
    text.write_text(corpus.heldout_text("pl")[:6000], encoding="utf-8")
    main(["-q", "bench", str(tiny_checkpoint), str(mlx_variants["mlx-q4"]), "--text", str(text),
          "--ctx", "256", "--out", str(tmp_path / "reports"), "--no-cards"])  # fmt: skip
    res = json.loads((tmp_path / "reports" / "results.json").read_text())
    (mlx,) = [v for v in res["variants"] if v["format"] == "mlx"]
    assert mlx["runtime"] == "mlx-lm"
    row = next(iter(mlx["rows"].values()))
    assert 0 < row["kld"] < KLD_4BIT_MAX and row["same_top"] > 0.9
