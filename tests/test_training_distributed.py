"""The same training under `torchrun --nproc-per-node 2` (DDP, gloo on CPU) as in one process with the
same global batch: the loss curves agree within 1e-4 nats per step (float32 all-reduce order).

Slow: about 2-4 minutes on 2 busy cores (two 2-process launches plus two single runs, each paying
the torch/transformers import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


def orlik(args: list[str], nproc: int, tmp: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "orlik", *args]
    env = {**os.environ, "ORLIK_QUIET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def curve(out: Path) -> list[float]:
    return json.loads((out / "training.json").read_text())["losses"]


def test_pretrain_two_processes_match_one(tokenizer_dir: Path, small_corpus: Path, tmp_path: Path) -> None:
    common = ["train", "pretrain", "--tokenizer", str(tokenizer_dir), "--corpus", str(small_corpus), "--steps", "4",
              "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--checkpoint-every", "1000"]  # fmt: skip
    orlik([*common, "--out", str(tmp_path / "one" / "fp16")], 1, tmp_path)
    orlik([*common, "--out", str(tmp_path / "two" / "fp16")], 2, tmp_path)
    one, two = curve(tmp_path / "one" / "fp16"), curve(tmp_path / "two" / "fp16")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < TOLERANCE, (one, two)
    rep = json.loads((tmp_path / "two" / "fp16" / "training.json").read_text())
    assert rep["processes"] == 2


def test_sft_two_processes_match_one(family_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = family_checkpoint("llama")
    common = [
        "train",
        "sft",
        str(ckpt),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--max-len",
        "128",
        "--threads",
        "1",
    ]
    orlik([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    orlik([*common, "--out", str(tmp_path / "two")], 2, tmp_path)
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < TOLERANCE, (one, two)
    a, b = (json.loads((tmp_path / d / "training.json").read_text())["alr"] for d in ("one", "two"))
    assert [r["loss_tokens"] for r in a] == [r["loss_tokens"] for r in b]  # ALR sees the global batch's T
