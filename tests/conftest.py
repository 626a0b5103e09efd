"""Shared fixtures: tiny checkpoints trained in the test session itself (no downloads)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private ORLIK_CACHE for converted GGUFs; the llama.cpp build is still found where it is."""
    from orlik import llamacpp

    root = tmp_path_factory.mktemp("orlik-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ORLIK_LLAMACPP", str(llamacpp.build_root()))
    mp.setenv("ORLIK_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A calibration dir whose calibration.jsonl has `orlik calibrate build`'s schema: corpus train
    documents, Polish and English, token counts from the checkpoint's tokenizer."""
    import json

    from orlik.checkpoint import Checkpoint
    from orlik.training import corpus

    tok = Checkpoint.open(tiny_checkpoint).load_tokenizer()
    out = tmp_path_factory.mktemp("calib")
    with open(out / "calibration.jsonl", "w", encoding="utf-8") as f:
        for lang in ("pl", "en"):
            for d in corpus.documents(lang=lang, split="train")[:40]:
                n = len(tok(d.text, add_special_tokens=False)["input_ids"])
                rec = {"text": d.text, "lang": lang, "domain": d.domain, "source": f"corpus:{d.id}", "tokens": n}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_imatrix(gguf_cache: Path, tiny_checkpoint: Path, tiny_calibration: Path) -> Path:
    """orlik's imatrix of the tiny checkpoint (mixed languages, 8 chunks of 128 tokens)."""
    from orlik.calibration import imatrix

    return Path(imatrix.compute(tiny_checkpoint, tiny_calibration, lang="mixed", chunk=128, max_chunks=8)["path"])
