"""`orlik train upscale`: depth up-scaling from layer ranges. The identity range gives the same
logits; a deeper model loads in transformers, converts and runs in llama.cpp with the same logits,
and continues pretraining (`orlik train pretrain --init`) with falling held-out loss; bad ranges are one line and exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_helpers import cli, random_checkpoint, tensors

from orlik import corpus


@pytest.fixture(scope="module")
def rand(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return random_checkpoint(tokenizer_dir, tmp_path_factory.mktemp("up") / "a", seed=5)


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch

    from orlik.checkpoint import Checkpoint

    with torch.inference_mode():
        return Checkpoint.open(path).load_model(torch.float32)(torch.tensor([ids])).logits[0].numpy()


def test_identity_range_reproduces_logits(rand: Path, tmp_path: Path) -> None:
    r = cli("-q", "train", "upscale", rand, "--layers", "0-5", "--out", tmp_path / "same")
    assert r.code == 0, r.err
    a, b = tensors(rand), tensors(tmp_path / "same")
    import torch

    assert a.keys() == b.keys()
    assert all(a[k].view(torch.int16).equal(b[k].view(torch.int16)) for k in a)
    ids = [1, 30, 400, 5, 1700, 22, 9]
    assert np.array_equal(_logits(rand, ids), _logits(tmp_path / "same", ids))


def test_solar_style_ranges_renumber_layers(rand: Path, tmp_path: Path) -> None:
    r = cli("-q", "train", "upscale", rand, "--layers", "0-3,2-5", "--out", tmp_path / "deep")
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "deep" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 8
    src, out = tensors(rand), tensors(tmp_path / "deep")
    assert len(out) == len(src) + 2 * 9  # two more layers of 9 tensors each
    for new, old in enumerate([0, 1, 2, 3, 2, 3, 4, 5]):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert out[f"model.layers.{new}.{name}"].equal(src[f"model.layers.{old}.{name}"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert out[name].equal(src[name])
    assert _logits(tmp_path / "deep", [1, 2, 3]).shape == (3, src["lm_head.weight"].shape[0])
    meta = json.loads((tmp_path / "deep" / "upscale.json").read_text())
    assert meta["layer_map"] == [0, 1, 2, 3, 2, 3, 4, 5]


def test_upscaled_runs_in_llamacpp(
    family_checkpoint: Callable[[str], Path], gguf_cache: Path, tmp_path: Path
) -> None:
    """qwen2 (tied embeddings, q/k/v biases) up-scaled 6 -> 9 layers, converted by orlik's GGUF step,
    gives transformers' logits in llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from orlik import gguf_convert
    from orlik.checkpoint import Checkpoint

    r = cli(
        "-q", "train", "upscale", family_checkpoint("qwen2"), "--layers", "0-4,2-5", "--out", tmp_path / "q"
    )
    assert r.code == 0, r.err
    ckpt = Checkpoint.open(tmp_path / "q")
    f16 = gguf_convert.f16_gguf(ckpt, outtype="f16")
    ids = ckpt.load_tokenizer().encode(corpus.heldout_text("pl")[:600])[:64]
    llm = llama_cpp.Llama(model_path=str(f16), n_ctx=128, logits_all=True, n_threads=1, verbose=False)
    try:
        assert llm.metadata["qwen2.block_count"] == "9"
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    ref = _logits(tmp_path / "q", ids).astype(np.float64)
    assert np.abs(got - ref).max() < 1e-2


@pytest.mark.slow  # ~1 min of CPU: 40 Trainer steps plus two full held-out evaluations
def test_upscaled_model_continues_pretraining(
    family_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """`orlik train pretrain --init` from the up-scaled checkpoint: held-out perplexity falls."""
    from orlik.training import evaluate

    r = cli(
        "-q", "train", "upscale", family_checkpoint("llama"), "--layers", "0-3,2-5", "--out", tmp_path / "u"
    )
    assert r.code == 0, r.err
    before = evaluate.heldout_report(tmp_path / "u", ctx=64)["all"]["ppl"]
    r = cli("-q", "train", "pretrain", "--init", tmp_path / "u", "--out", tmp_path / "cont" / "fp16",
            "--steps", "40", "--batch-size", "4", "--seq-len", "64", "--lr", "3e-3",
            "--threads", "1", "--checkpoint-every", "10000")  # fmt: skip
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "cont" / "fp16" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8
    after = evaluate.heldout_report(tmp_path / "cont" / "fp16", ctx=64)["all"]["ppl"]
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize(
    ("layers", "words"),
    [("0-3,1-2", "overlap"), ("0-6", "out of range"), ("4-2", "backwards"), ("0-3;4-5", "bad layer range"),
     ("", "bad layer range")],
)  # fmt: skip
def test_bad_ranges_one_line_exit_2(rand: Path, tmp_path: Path, layers: str, words: str) -> None:
    r = cli("-q", "train", "upscale", rand, "--layers", layers, "--out", tmp_path / "x")
    assert r.code == 2 and r.err.count("\n") == 1 and words in r.err, r.err
    assert list(tmp_path.iterdir()) == []
