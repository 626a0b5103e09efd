"""`orlik train merge`: streamed linear merges, bit-exact where the arithmetic is exact, equal to
mergekit's own result tensor for tensor, and one-line refusals of checkpoints that cannot merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import cli, random_checkpoint, tensors


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge")
    return (random_checkpoint(tokenizer_dir, root / "a", seed=0),
            random_checkpoint(tokenizer_dir, root / "b", seed=1))  # fmt: skip


def _assert_same(a: dict, b: dict, bits: bool = True) -> None:
    """Same names, dtypes and shapes; bit for bit (bits=True) or value for value (-0.0 == 0.0)."""
    import torch

    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if bits:
            assert a[k].view(torch.int16).equal(b[k].view(torch.int16)), f"{k} differs"
        else:
            assert torch.equal(a[k], b[k]), f"{k} differs"


def test_self_merge_is_bit_exact_and_loads(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    from orlik.checkpoint import Checkpoint

    a, _ = pair
    r = cli("-q", "train", "merge", a, a, a, "--out", tmp_path / "m")
    assert r.code == 0, r.err
    _assert_same(tensors(a), tensors(tmp_path / "m"))
    ids = torch.tensor([[1, 50, 300, 7, 1200]])
    with torch.no_grad():
        want = Checkpoint.open(a).load_model().forward(ids).logits
        got = Checkpoint.open(tmp_path / "m").load_model().forward(ids).logits
    assert torch.equal(want, got)
    meta = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert meta["weights"] == [1.0, 1.0, 1.0] and meta["normalize"] is True


def test_weights_one_zero_return_the_first(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    assert cli("-q", "train", "merge", a, b, "--weights", "1,0", "--out", tmp_path / "m").code == 0
    _assert_same(tensors(a), tensors(tmp_path / "m"))
    assert cli("-q", "train", "merge", a, b, "--weights", "0,1", "--out", tmp_path / "m").code == 0
    _assert_same(tensors(b), tensors(tmp_path / "m"))


def test_linear_arithmetic(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """0.3 a + 0.7 b, unnormalized 2 a - b: float32 sums rounded once to float16."""
    a, b = pair
    ta, tb = tensors(a), tensors(b)
    assert cli("-q", "train", "merge", a, b, "--weights", "0.3,0.7", "--out", tmp_path / "m").code == 0
    tm = tensors(tmp_path / "m")
    k = "model.layers.2.mlp.up_proj.weight"
    want = (0.3 * ta[k].float() + 0.7 * tb[k].float()).half()
    assert (tm[k].float() - want.float()).abs().max() <= 1e-3 * want.float().abs().max()
    assert not tm[k].equal(ta[k]) and not tm[k].equal(tb[k])
    r = cli("-q", "train", "merge", a, b, "--weights", "2,-1", "--no-normalize", "--out", tmp_path / "n")
    assert r.code == 0, r.err
    tn = tensors(tmp_path / "n")
    assert tn[k].equal((2 * ta[k].float() - tb[k].float()).half())


@pytest.mark.skipif(shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) is None,
                    reason="mergekit is not installed (pip install -e '.[mergekit]')")  # fmt: skip
def test_equals_mergekit_tensor_for_tensor(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The same mergekit YAML through mergekit-yaml and through orlik: identical tensors."""
    a, b = pair
    cfg = tmp_path / "linear.yml"
    cfg.write_text(
        f"models:\n  - model: {a}\n    parameters:\n      weight: 0.3\n"
        f"  - model: {b}\n    parameters:\n      weight: 0.55\n"
        "merge_method: linear\nparameters:\n  normalize: true\ndtype: float16\n"
    )
    mk = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(mk), str(cfg), str(tmp_path / "mk"), "--no-write-model-card", "--no-copy-tokenizer",
                    "--quiet"], check=True, capture_output=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    r = cli("-q", "train", "merge", "--config", cfg, "--out", tmp_path / "orlik")
    assert r.code == 0, r.err
    # Value for value: mergekit sums from +0.0, so where every input holds -0.0 it writes +0.0.
    _assert_same(tensors(tmp_path / "mk"), tensors(tmp_path / "orlik"), bits=False)


def _refused(r, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert r.code == 2, (r.code, r.err)
    line = r.err.strip()
    assert line.startswith("orlik: error:") and "\n" not in line, line
    for w in words:
        assert w in line, line


def test_shape_and_tokenizer_mismatch_refused(
    pair: tuple[Path, Path], tokenizer_dir: Path, tmp_path: Path
) -> None:
    a, _ = pair
    wide = random_checkpoint(tokenizer_dir, tmp_path / "wide", intermediate_size=512)
    _refused(cli("train", "merge", a, wide, "--out", tmp_path / "m"), "shape mismatch", "mlp")
    other_tok = tmp_path / "tok"
    shutil.copytree(a, other_tok)
    tj = json.loads((other_tok / "tokenizer.json").read_text())
    tj["model"]["vocab"] = {k + ("x" if v == 100 else ""): v for k, v in tj["model"]["vocab"].items()}
    (other_tok / "tokenizer.json").write_text(json.dumps(tj))
    _refused(cli("train", "merge", a, other_tok, "--out", tmp_path / "m"), "tokenizer mismatch")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_bad_configs_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: ties\n")
    _refused(cli("train", "merge", "--config", cfg, "--out", tmp_path / "m"), "ties")
    cfg.write_text(f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: linear\n")
    _refused(cli("train", "merge", "--config", cfg, "--out", tmp_path / "m"), "weight")
    _refused(cli("train", "merge", a, b, "--weights", "1", "--out", tmp_path / "m"), "1 weights")
    _refused(cli("train", "merge", a, b, "--weights", "1,-1", "--out", tmp_path / "m"), "sum to 0")
    cfg.write_bytes(b"models: \xff\xfe\n")
    _refused(cli("train", "merge", "--config", cfg, "--out", tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_sharded_input_and_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A sharded checkpoint (as every 7B one is) merges like a single file; output shards plus an
    index load in transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from orlik.checkpoint import Checkpoint
    from orlik.training import tensorio

    a, _ = pair
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(a), dtype=torch.float16).save_pretrained(
        str(sharded), max_shard_size="2MB"
    )
    for f in a.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, sharded / f.name)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    r = cli("-q", "train", "merge", a, sharded, "--out", tmp_path / "m")
    assert r.code == 0, r.err
    _assert_same(tensors(a), tensors(tmp_path / "m"))
    infos = tensorio.checkpoint_tensors(Checkpoint.open(a).weight_files)
    planned = [tensorio.OutTensor(n, i.dtype, i.shape) for n, i in infos.items()]
    out = tmp_path / "out"
    out.mkdir()
    with tensorio.TensorReader() as reader:
        files = tensorio.write_checkpoint_weights(out, planned, (reader.chunks(i, 1000) for i in infos.values()),
                                                  shard_bytes=3 << 20)  # fmt: skip
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    shutil.copy(a / "config.json", out / "config.json")
    _assert_same(tensors(a), tensors(out))
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 6
