"""Group sizes a width does not divide (hidden size 320 with groups of 128), for every grouped
backend; a variant is kept only once it runs in its runtime; one failed recipe of several keeps
the others' variants and the run ends with a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orlik.errors import InputError
from orlik.manifest import Variant
from orlik.quantize.backends import groups

# 320 = 5 x 64: q/k/v/o/gate/up (320 inputs) cannot take groups of 128; down_proj (768) can.
NARROW = 320
CALIB = ("--option", "calib_samples=8", "--option", "calib_seq_len=64")


@pytest.fixture(scope="module")
def narrow(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer llama with hidden size 320 (random weights: the shapes are what is tested)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("narrow320") / "fp16"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=NARROW, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def narrow_calib(narrow: Path, tiny_calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's calibration set (same tokenizer) in a directory of its own."""
    d = tmp_path_factory.mktemp("narrow-calib")
    (d / "calibration.jsonl").write_bytes((tiny_calibration / "calibration.jsonl").read_bytes())
    return d


def _quantize(orlik_cli: Any, ckpt: Path, recipe: str, out: Path, *extra: Any) -> tuple[Any, Variant | None]:
    r = orlik_cli("--json", "quantize", ckpt, "--recipe", recipe, "--out", out, *extra)
    v = Variant.load(out / recipe) if (out / recipe / "variant.json").is_file() else None
    return r, v


def _check_narrow(v: Variant, group: int) -> None:
    """Every 320-wide module got a dividing group size (or stayed FP16), recorded and run once."""
    by_module, kept = v.extra["group_size_by_module"], v.extra["kept_fp16_for_width"]
    for layer in range(2):
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            name = f"model.layers.{layer}.{m}"
            assert by_module.get(name) == 64 or kept.get(name) == NARROW, name
        assert f"model.layers.{layer}.mlp.down_proj" not in {**by_module, **kept}  # 768 = 6 x 128
    assert v.recipe["group_size"] == group
    assert v.extra["runtime_check"]["tokens"] > 0


def test_plan_takes_a_dividing_group_or_keeps_or_refuses() -> None:
    widths = {"model.layers.0.self_attn.q_proj": 320, "model.layers.0.mlp.down_proj": 768,
              "model.layers.0.mlp.odd": 100}  # fmt: skip
    p = groups.plan("x-g128", widths, 128, (32, 64, 128), per_module=True, keep=True, fmt="hqq")
    assert p.by_module == {"model.layers.0.self_attn.q_proj": 64}
    assert p.kept == {"model.layers.0.mlp.odd": 100}  # no group of 32 or more divides 100
    assert p.group_of("model.layers.0.mlp.down_proj") == 128 and p.group_of("model.layers.0.mlp.odd") is None
    keep_only = groups.plan("x-g128", widths, 128, (32, 64, 128), per_module=False, keep=True, fmt="awq")
    assert set(keep_only.kept) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.odd"}
    with pytest.raises(InputError, match=r"x-g128: model.layers.0.self_attn.q_proj has 320 input features"):
        groups.plan("x-g128", widths, 128, (32, 64, 128), per_module=False, keep=False, fmt="exl2")


def test_widths_come_from_the_headers(narrow: Path) -> None:
    from orlik.checkpoint import Checkpoint

    w = groups.widths(Checkpoint.open(narrow))
    assert w["model.layers.1.self_attn.k_proj"] == NARROW and w["model.layers.1.mlp.down_proj"] == 768
    assert "lm_head" not in w and "model.embed_tokens" not in w
    dense = groups.widths(Checkpoint.open(narrow), dense=True)
    assert dense["lm_head"] == NARROW and dense["model.embed_tokens"] == NARROW


def test_hqq_group_128_on_width_320(narrow: Path, tmp_path: Path, orlik_cli: Any) -> None:
    pytest.importorskip("hqq")
    r, v = _quantize(orlik_cli, narrow, "hqq-4bit-g128", tmp_path)
    assert r.code == 0, r.err
    assert v is not None and v.extra["runtime_check"]["runtime"] == "hqq"
    _check_narrow(v, 128)
    assert not v.extra["kept_fp16_for_width"]  # HQQ stores a group size per layer
    # The state dict HQQLinear reads back carries each layer's own group size.
    from safetensors import safe_open

    with safe_open(str(v.path / "model.safetensors"), "pt") as f:
        q_meta = f.get_tensor("model.layers.0.self_attn.q_proj.group_size")
        down_meta = f.get_tensor("model.layers.0.mlp.down_proj.group_size")
    assert int(q_meta) == 64 and int(down_meta) == 128


def test_mlx_group_128_on_width_320(narrow: Path, tmp_path: Path, orlik_cli: Any) -> None:
    pytest.importorskip("mlx_lm")
    r, v = _quantize(orlik_cli, narrow, "mlx-q4-g128", tmp_path)
    assert r.code == 0, r.err
    assert v is not None and v.extra["runtime_check"]["runtime"] == "mlx-lm"
    _check_narrow(v, 128)
    cfg = json.loads((v.path / "config.json").read_text())["quantization"]
    # mlx-lm is called with the smallest group in use (it skips, unasked, layers whose width its
    # default does not divide); the layers that take the recipe's 128 get per-layer entries.
    assert cfg["group_size"] == 64 and cfg["model.layers.0.mlp.down_proj"]["group_size"] == 128
    assert "model.layers.0.self_attn.q_proj" not in cfg
    assert v.extra["group_size_by_module"]["lm_head"] == 64  # MLX quantizes the head and embeddings too


def test_failed_recipe_keeps_the_others_and_ends_with_a_summary(
    narrow: Path, tmp_path: Path, orlik_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("hqq")
    from orlik.quantize.backends import hqq

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a library bug\nwith a second line")

    monkeypatch.setattr(hqq.HQQBackend, "quantize", broken)
    r = orlik_cli("quantize", narrow, "--recipe", "Q8_0", "--recipe", "hqq-4bit-g64", "--recipe", "Q4_0",
                  "--out", tmp_path)  # fmt: skip
    assert r.code == 1  # a library broke, not the user's input
    lines = r.out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [
        ["Q8_0", "built"],
        ["hqq-4bit-g64", "failed"],
        ["Q4_0", "built"],
    ]
    assert "RuntimeError: a library bug" in lines[1]
    assert r.err.strip().splitlines()[-1] == (
        "orlik: error: hqq-4bit-g64: RuntimeError: a library bug (1 failed, 2 kept)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q4_0", "Q8_0"]
    for name in ("Q8_0", "Q4_0"):
        v = Variant.load(tmp_path / name)
        assert not v.verify() and v.extra["runtime_check"]["runtime"] == "llama.cpp"


def test_variant_that_does_not_run_is_not_kept(
    narrow: Path, tmp_path: Path, orlik_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("hqq")
    import numpy as np

    from orlik.serving.runtimes import hqq as hqq_runtime

    def nan_logits(self: Any, tokens: list[int]) -> Any:
        return np.full((len(tokens), self.n_vocab), np.nan, dtype=np.float32)

    monkeypatch.setattr(hqq_runtime.HQQRuntime, "logits", nan_logits)
    r = orlik_cli("quantize", narrow, "--recipe", "hqq-4bit-g64", "--out", tmp_path)
    assert r.code == 2
    assert r.err.startswith(
        "orlik: error: built, but it does not load and run in its runtime: hqq gave logits"
    )
    assert list(tmp_path.iterdir()) == []  # neither the variant nor its partial directory


def _check_scales_folded_into_fp16_up_proj(variant: Path, ckpt: Path) -> None:
    """AWQ scales down_proj's input channels by s and folds 1/s into the op producing that input:
    up_proj, which stays FP16 here. Its saved rows must be the original rows, each times one factor,
    and not all factors 1 (GPTQModel paired down_proj with the 320-wide norm and stopped the process)."""
    import torch
    from safetensors import safe_open

    key = "model.layers.{}.mlp.up_proj.weight"
    with (
        safe_open(str(variant / "model.safetensors"), "pt") as f,
        safe_open(str(ckpt / "model.safetensors"), "pt") as g,
    ):
        for layer in range(2):
            new, old = f.get_tensor(key.format(layer)).float(), g.get_tensor(key.format(layer)).float()
            ok = old.abs() > 1e-3  # ratios of tiny FP16 weights are mostly rounding
            ratio = torch.where(ok, new / torch.where(ok, old, torch.ones_like(old)), torch.nan)
            per_row = ratio.nanmedian(dim=1).values
            assert torch.nanmean(((ratio - per_row[:, None]) / per_row[:, None]).abs()) < 5e-3
            assert (per_row - 1).abs().median() > 1e-2


@pytest.mark.parametrize("recipe", ["gptq-w4g128", "awq-w4g128"])
def test_gptqmodel_group_128_on_width_320(
    recipe: str, narrow: Path, narrow_calib: Path, tmp_path: Path, orlik_cli: Any
) -> None:
    """GPTQ/AWQ checkpoints hold one group size: the 320-wide kinds stay FP16 in every block, named
    where transformers' loader reads them, and the variant loads and runs (CI: make test-gptq)."""
    pytest.importorskip("gptqmodel", reason='GPTQModel is not installed (make test-gptq, or "orlik[gptq]")')
    r, v = _quantize(orlik_cli, narrow, recipe, tmp_path, "--calib", narrow_calib, *CALIB)
    assert r.code == 0, r.err
    assert v is not None and v.extra["runtime_check"]["runtime"] == "transformers+gptqmodel"
    _check_narrow(v, 128)
    assert not v.extra["group_size_by_module"] and len(v.extra["kept_fp16_for_width"]) == 2 * 6
    q = json.loads((v.path / "config.json").read_text())["quantization_config"]
    if recipe.startswith("awq"):
        assert {"self_attn.q_proj", "mlp.up_proj"} <= set(q["modules_to_not_convert"])
        _check_scales_folded_into_fp16_up_proj(v.path, narrow)
    else:
        assert q["modules_in_block_to_quantize"] == [["mlp.down_proj"]]
    from safetensors import safe_open

    with safe_open(str(v.path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.qweight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    # Whole-model bpw counts the FP16 modules at 16 bits: far above the quantized layers' own.
    assert v.bpw > 8 and v.extra["quantized_linear_bpw"] < 5
