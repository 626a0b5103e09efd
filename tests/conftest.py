"""Shared fixtures: tiny checkpoints trained in the test session itself (no downloads)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ.setdefault("ORLIK_QUIET", "1")


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(*args: str | Path) -> CliResult:
    """`orlik ARGS...` in this process, through the console script's own main(): exit code, stdout, stderr."""
    from orlik.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def orlik_cli() -> Callable[..., CliResult]:
    """The in-process CLI runner every test file uses: `orlik_cli("quantize", ckpt, "--recipe", "Q8_0")`."""
    return run_cli


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

    from orlik import corpus
    from orlik.checkpoint import Checkpoint

    tok = Checkpoint.open(tiny_checkpoint).load_tokenizer()
    out = tmp_path_factory.mktemp("calib")
    with open(out / "calibration.jsonl", "w", encoding="utf-8") as f:
        for lang in ("pl", "en"):
            for d in corpus.documents(lang=lang, split="train")[:40]:
                n = len(tok(d.text, add_special_tokens=False)["input_ids"])
                rec = {"text": d.text, "lang": lang, "domain": d.domain, "source": d.id, "tokens": n}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_imatrix(gguf_cache: Path, tiny_checkpoint: Path, tiny_calibration: Path) -> Path:
    """orlik's imatrix of the tiny checkpoint (mixed languages, 8 chunks of 128 tokens)."""
    from orlik.calibration import imatrix

    card = imatrix.compute(tiny_checkpoint, tiny_calibration, lang="mixed", chunk=128, max_chunks=8)
    return Path(card["path"])


@pytest.fixture(scope="session")
def serving_gguf(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint as a Q8_0 GGUF variant directory (llama.cpp's converter + llama-quantize)."""
    import subprocess
    import sys

    from orlik import llamacpp
    from orlik.checkpoint import Checkpoint
    from orlik.errors import MissingDependencyError
    from orlik.manifest import Variant, hash_files

    try:
        convert, quantize = llamacpp.converter(), llamacpp.tool("llama-quantize")
    except MissingDependencyError as e:
        pytest.skip(str(e))
    work = tmp_path_factory.mktemp("serving-gguf")
    f16, out = work / "f16.gguf", work / "tiny-q8_0"
    out.mkdir()
    subprocess.run([sys.executable, str(convert), str(tiny_checkpoint), "--outtype", "f16", "--outfile", str(f16)],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(
        [str(quantize), str(f16), str(out / "model.gguf"), "Q8_0"], check=True, capture_output=True
    )
    size = (out / "model.gguf").stat().st_size
    ckpt = Checkpoint.open(tiny_checkpoint)
    n_params = ckpt.weights_bytes // 2  # an fp16 checkpoint: 2 bytes per weight
    Variant(name="tiny-q8_0", format="gguf", recipe={"name": "Q8_0", "format": "gguf", "type": "Q8_0"},
            base_hash=ckpt.hash, files=hash_files(out), bytes=size, bpw=round(size * 8 / n_params, 3),
            tools={"llama.cpp": llamacpp.build_info()}).save(out)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus directory in the built-in layout holding a few real records: 4 Polish and 2 English
    train documents, one held-out document per language, 20 parallel pairs and 8 chats.
    Pretraining on it takes seconds, for tests of the training loop itself."""
    import json

    from orlik import corpus

    root = tmp_path_factory.mktemp("small-corpus")

    def write(path: Path, records: list[dict[str, object]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    for lang, n_train in (("pl", 4), ("en", 2)):
        docs = corpus.documents(lang=lang, domain="news")
        train, held = [d for d in docs if d.split == "train"], [d for d in docs if d.split == "heldout"]
        picked = train[:n_train] + held[:1]
        write(root / lang / "news.jsonl", [vars(d) for d in picked])
    write(root / "parallel.jsonl", corpus.parallel(split="train")[:20])
    write(root / "chat.jsonl", corpus.chats(split="train")[:8])
    return root


@pytest.fixture(scope="session")
def family_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, small_corpus: Path
) -> Callable[[str], Path]:
    """An FP16 checkpoint of any family (llama, mistral, qwen2), built once per family: 20 steps on
    `small_corpus`. Cheap; for tests of export, templates and conversion, not of model quality.
    One torch thread: on a busy 2-core machine two threads spin against each other (measured 28 s
    wall / 11 s CPU with 1 thread vs 189 s / 84 s with 2 under load 12)."""
    from orlik.training import pretrain

    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"family-{arch}") / "fp16"
            pretrain.run(out, arch=arch, size="tiny", tokenizer_dir=tokenizer_dir, corpus_dir=small_corpus,
                         steps=20, batch_size=4, seq_len=64, lr=3e-3, checkpoint_every=10_000,
                         threads=1)  # fmt: skip
            built[arch] = out
        return built[arch]

    return make


@pytest.fixture(scope="session")
def bench_ggufs(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    """The tiny checkpoint as GGUF files made directly with llama.cpp's converter and llama-quantize
    ("F16", "Q8_0", "Q4_K_M", "Q2_K"), plus "variants": a dir holding the three quantized ones as
    variants with hand-written manifests. The evaluator's tests use these, not orlik's GGUF backend."""
    from bench_helpers import convert_f16, make_variant, quantize

    root = tmp_path_factory.mktemp("bench-gguf")
    out = {"F16": convert_f16(tiny_checkpoint, root / "f16.gguf")}
    for q in ("Q8_0", "Q4_K_M", "Q2_K"):
        out[q] = quantize(out["F16"], q, root / f"{q}.gguf")
        make_variant(out[q], q, root / "variants", tiny_checkpoint)
    out["variants"] = root / "variants"
    return out
