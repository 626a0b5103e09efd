"""Does a GGUF tokenize like its checkpoint? llama.cpp re-implements each tokenizer family, and its
pre-tokenizer can split text where the Hugging Face tokenizer does not (byte-level BPE merging "\\n"
and " " before a digit, say). `orlik bench` scores every variant on the checkpoint's ids either way;
this measures the disagreement on the calibration text, so that `orlik quantize` can say how often a
served GGUF will see a different split."""

from __future__ import annotations

import json
from pathlib import Path

from orlik import progress
from orlik.checkpoint import Checkpoint
from orlik.manifest import Variant
from orlik.tokenstats import differing_tokens

MAX_TEXTS = 200  # calibration samples compared; enough to show a systematic difference


def disagreement(ckpt: Checkpoint, gguf: Path, jsonl: Path) -> tuple[int, int]:
    """(differing, total) tokens of the checkpoint's tokenizer on the first samples of `jsonl`."""
    import llama_cpp

    texts = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(str(json.loads(line)["text"]))
            if len(texts) >= MAX_TEXTS:
                break
    hf = ckpt.load_tokenizer()
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    differing = total = 0
    try:
        for t in texts:
            ref = hf(t, add_special_tokens=False)["input_ids"]
            own = llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
            differing += differing_tokens(ref, own)
            total += len(ref)
    finally:
        llm.close()
    return differing, total


def warn_if_different(ckpt: Checkpoint, variants: list[Variant], jsonl: Path | None) -> float | None:
    """Compare the first GGUF variant's tokenizer (all GGUFs of a checkpoint share it) with the
    checkpoint's on the calibration text; warn when they differ. Returns the differing share."""
    gguf = next((v for v in variants if v.format == "gguf" and v.path is not None), None)
    if gguf is None or jsonl is None or not Path(jsonl).is_file():
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None  # the GGUF backend itself needs it; nothing to compare with here
    assert gguf.path is not None
    name = next(n for n in gguf.files if n.endswith(".gguf"))
    differing, total = disagreement(ckpt, gguf.path / name, Path(jsonl))
    share = differing / max(1, total)
    if differing:
        progress.warn(f"the GGUF tokenizer (llama.cpp) splits the calibration text differently from the "
                      f"checkpoint's for {differing} of {total} tokens ({100 * share:.2f}%): `orlik bench` scores "
                      "every variant on the checkpoint's ids, but a served GGUF sees llama.cpp's split")  # fmt: skip
    return share
