"""FP16 checkpoint directories: validated before loading, safetensors only, and every damaged or
unsupported directory is one clear line and exit code 2 through `orlik inspect`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orlik.checkpoint import Checkpoint
from orlik.errors import CheckpointError


def truncate(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 1000)


def garbage_header_length(ckpt: Path) -> None:
    with open(ckpt / "model.safetensors", "r+b") as fh:
        fh.write((1 << 60).to_bytes(8, "little"))


def garbage_header_json(ckpt: Path) -> None:
    with open(ckpt / "model.safetensors", "r+b") as fh:
        fh.seek(8)
        fh.write(b"\x00garbage{")


def pickle_only(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")


def no_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


def bad_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")


def no_tokenizer(ckpt: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model"):
        (ckpt / name).unlink()


def missing_shard(ckpt: Path) -> None:
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            truncate,
            r"corrupt safetensors file .*model.safetensors: tensor data ends at \d+ but the file has \d+ bytes",
        ),
        (garbage_header_length, r"corrupt safetensors file .*: header length out of range"),
        (garbage_header_json, r"corrupt safetensors file .*model.safetensors"),
        (pickle_only, r"holds only pickle weights \(pytorch_model.bin\); orlik loads safetensors only"),
        (no_config, r"has no config.json; is it a Hugging Face model directory\?"),
        (bad_config, r"config.json is not valid UTF-8 JSON: "),
        (no_tokenizer, r"has no tokenizer \(tokenizer.json or tokenizer.model\)"),
        (missing_shard, r"is missing shards: model-00002-of-00002.safetensors"),
    ],
)
def test_damaged_checkpoint_is_a_one_line_error_exit_2(
    damage: Callable[[Path], None], message: str, checkpoint_copy: Path, orlik_cli: Any
) -> None:
    import re

    damage(checkpoint_copy)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(checkpoint_copy)
    code, out, err = orlik_cli("--json", "inspect", checkpoint_copy)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orlik: error: ") and re.search(message, lines[0]), err


def test_missing_directory(tmp_path: Path, orlik_cli: Any) -> None:
    with pytest.raises(CheckpointError, match="does not exist or is not a directory"):
        Checkpoint.open(tmp_path / "nope")
    code, _, err = orlik_cli("--json", "inspect", tmp_path / "nope")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_pickle_weights_are_never_loaded(checkpoint_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory with both safetensors and a pickle loads the safetensors and never unpickles."""
    import pickle

    import torch

    (checkpoint_copy / "pytorch_model.bin").write_bytes(b"not a pickle at all")

    def no_unpickling(*a: object, **k: object) -> None:
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    ckpt = Checkpoint.open(checkpoint_copy)
    assert [w.name for w in ckpt.weight_files] == ["model.safetensors"]
    model = ckpt.load_model()
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_inspect_good_checkpoint_and_hash(checkpoint_copy: Path, orlik_cli: Any) -> None:
    code, out, err = orlik_cli("--json", "inspect", checkpoint_copy)
    assert code == 0, err
    info = json.loads(out)
    assert info["arch"] == "llama" and info["chat_template"] is True
    assert info["weights_bytes"] == (checkpoint_copy / "model.safetensors").stat().st_size
    ckpt = Checkpoint.open(checkpoint_copy)
    assert ckpt.hash == info["hash"] and len(ckpt.hash) == 64
    # The hash names this exact checkpoint: a copy elsewhere has the same one, a changed weight does not.
    other = checkpoint_copy.with_name("elsewhere")
    shutil.copytree(checkpoint_copy, other)
    assert Checkpoint.open(other).hash == ckpt.hash
    with open(other / "model.safetensors", "r+b") as fh:
        fh.seek(-2, 2)
        last = fh.read(2)
        fh.seek(-2, 2)
        fh.write(bytes(b ^ 0xFF for b in last))
    assert Checkpoint.open(other).hash != ckpt.hash
