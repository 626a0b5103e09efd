"""Shared fixtures: tiny checkpoints trained in the test session itself (no downloads)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("ORLIK_QUIET", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orlik.training import tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer.build(out, vocab_size=2000)
    return out


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[..., Path]:
    """Build (once per arguments) a briefly trained tiny checkpoint of an architecture family."""
    from orlik.training import pretrain

    built: dict[tuple[str, int], Path] = {}

    def make(arch: str = "llama", steps: int = 60) -> Path:
        key = (arch, steps)
        if key not in built:
            out = tmp_path_factory.mktemp(f"ckpt-{arch}") / "fp16"
            pretrain.run(out, arch=arch, size="tiny", tokenizer_dir=tokenizer_dir, steps=steps,
                         batch_size=8, seq_len=128, lr=3e-3, checkpoint_every=10_000)  # fmt: skip
            built[key] = out
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """A llama-family FP16 checkpoint with tokenizer, chat template and generation config."""
    return make_checkpoint("llama")


@pytest.fixture
def checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst
