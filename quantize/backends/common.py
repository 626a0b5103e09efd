"""What the GPTQ, AWQ, HQQ and MLX backends share: library checks, the calibration text, tensor-byte
accounting (bits per weight with scales, zeros and indices counted) and the manifest.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orlik import corpus
from orlik.checkpoint import Checkpoint, safetensors_layout
from orlik.errors import InputError
from orlik.fsutil import sha256_file
from orlik.manifest import Variant, hash_files
from orlik.quantize.backends import Calibration
from orlik.quantize.recipe import Recipe
from orlik.sysinfo import package_version

BPW_DEFINITION = "8 x tensor-data bytes / parameters of the FP16 checkpoint, over all tensors (as GGUF's BPW)"


# Options of every backend that reads calibration.jsonl through calibration_texts/_batches.
CALIBRATION_OPTIONS: dict[str, type] = {
    "calib_samples": int,
    "calib_seq_len": int,
    "chat_template": bool,
    "seed": int,
}


def missing_modules(modules: Iterable[str], extra: str) -> str | None:
    """The install hint when any of `modules` cannot be imported here, else None."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return f'{", ".join(absent)} not installed; pip install "orlik[{extra}]"'


def version(dist: str) -> str:
    """A tool version for variant.json ("unknown" rather than absent)."""
    return package_version(dist) or "unknown"


def check_arch(ckpt: Checkpoint, supported: Iterable[str], library: str) -> None:
    """An architecture the library has no model definition for is the user's to change: say which."""
    names = sorted(set(supported))
    if ckpt.arch not in names:
        shown = ", ".join(n for n in names if n in _COMMON_ARCHS) or ", ".join(names[:12])
        raise InputError(f"{library} cannot quantize architecture {ckpt.arch!r} (supported include: {shown})")


_COMMON_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


# --- calibration -------------------------------------------------------------------------------


def require_calibration(recipe: Recipe, calib: Calibration) -> None:
    if calib is None or calib.jsonl is None:
        raise InputError(
            f"recipe {recipe.name} needs a calibration set (--calib DIR from `orlik calibrate build`)"
        )
    if not Path(calib.jsonl).is_file():
        raise InputError(f"calibration file {calib.jsonl} does not exist")


def calibration_texts(calib: Calibration, recipe: Recipe, tokenizer: Any) -> list[str]:
    """The calibration set's texts, rendered through the chat template when the recipe asks.

    Records come from `orlik calibrate build` ({"text", "lang", ...} per line); chat samples in it
    are already rendered, so the option only wraps plain texts as a user turn.
    """
    require_calibration(recipe, calib)
    path = Path(calib.jsonl)  # type: ignore[arg-type]
    texts: list[str] = []
    for i, rec in enumerate(corpus.read_jsonl(path), 1):
        if not isinstance(rec.get("text"), str):
            raise InputError(f'{path}: record {i} needs a "text" string')
        texts.append(rec["text"])
    if not texts:
        raise InputError(f"calibration file {path} holds no texts")
    if recipe.options.get("chat_template"):
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"recipe {recipe.name} asks for the chat template but the checkpoint has none")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts
        ]
    return texts


def calibration_batches(
    texts: list[str], tokenizer: Any, recipe: Recipe, *, pack: bool = False, samples: int = 128
) -> list[dict[str, list[int]]]:
    """Tokenized samples, at most `calib_samples` of at most `calib_seq_len` tokens, in file order.

    With `pack`, the texts are joined (EOS between them) and cut into blocks of exactly
    `calib_seq_len` tokens, as AWQ's reference calibration does: every block has the same shape, so
    a library can stack all of them rather than keep only the last variable-length batch.
    """
    n = int(recipe.options.get("calib_samples", samples))
    seq = int(recipe.options.get("calib_seq_len", 512))
    out: list[dict[str, list[int]]] = []
    if pack:
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for t in texts:
            stream += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if len(stream) >= n * seq:
                break
        out = [{"input_ids": stream[i : i + seq], "attention_mask": [1] * seq}
               for i in range(0, len(stream) - seq + 1, seq)][:n]  # fmt: skip
        if not out:
            raise InputError(f"the calibration set holds {len(stream)} tokens, fewer than one block of {seq}")
        return out
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True, truncation=True, max_length=seq)["input_ids"]
        if len(ids) >= 16:  # shorter samples add little Hessian/activation signal
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(out) >= n:
            break
    if not out:
        raise InputError("the calibration set has no sample of 16 tokens or more")
    return out


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- sizes -------------------------------------------------------------------------------------

_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def _glibc() -> Any | None:
    import ctypes

    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.mallopt, lib.malloc_trim  # noqa: B018  (both exist in glibc only)
    except (OSError, AttributeError):
        return None
    return lib


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so a
    layer-by-layer loop's peak RSS would grow with every layer's temporaries)."""
    import gc

    gc.collect()
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def lean_malloc() -> None:
    """For a library whose layer loop allocates and frees large tensors out of orlik's reach
    (GPTQModel): blocks of 128 KiB and up come from mmap and go back to the OS when freed, the
    heap is trimmed as soon as 128 KiB are free at its top, and threads share two arenas. It
    trades some time (more page faults) for a peak that tracks what is live, and holds for the rest
    of the process. glibc only; a no-op elsewhere."""
    lib = _glibc()
    if lib is None:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
    for option, value in ((m_arena_max, 2), (m_mmap_threshold, 128 << 10), (m_trim_threshold, 128 << 10)):
        lib.mallopt(option, value)


def safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor name -> dtype, shape, data_offsets (checkpoint.safetensors_layout without the start)."""
    return safetensors_layout(path)[1]


def tensor_bytes(files: Iterable[Path]) -> dict[str, int]:
    """Bytes of tensor data per tensor name, from the safetensors headers."""
    out: dict[str, int] = {}
    for f in files:
        for name, meta in safetensors_header(f).items():
            start, end = meta["data_offsets"]
            out[name] = int(end) - int(start)
    return out


def manifest(
    ckpt: Checkpoint,
    recipe: Recipe,
    calib: Calibration,
    out: Path,
    *,
    fmt: str,
    tools: dict[str, str],
    marker: str,
    extra: dict[str, Any] | None = None,
) -> Variant:
    """The Variant for a finished directory: hashes, measured size and bpw.

    `marker` is the tensor suffix that only quantized layers have (".qweight", ".W_q", ".scales");
    every tensor of such a layer (packed weights, scales, zeros, group indices) counts towards
    the quantized layers' own bpw, reported beside the whole-model figure.
    """
    weights = sorted(out.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{out} holds no safetensors weights after quantization")
    sizes = tensor_bytes(weights)
    data_bytes = sum(sizes.values())
    n_params = ckpt.n_params
    prefixes = {k[: -len(marker)] for k in sizes if k.endswith(marker)}
    linear_bytes = sum(b for k, b in sizes.items() if k.rsplit(".", 1)[0] in prefixes)
    linear_params = _fp16_params_of(ckpt, prefixes)
    files = hash_files(out)
    used_calib = recipe.calibration and calib.jsonl is not None
    info: dict[str, Any] = {
        "bpw_definition": BPW_DEFINITION,
        "tensor_bytes": data_bytes,
        "parameters": n_params,
        "quantized_linear_bpw": round(8 * linear_bytes / linear_params, 4) if linear_params else None,
        "quantized_linear_parameters": linear_params,
        "fp16_bytes": ckpt.weights_bytes,
    }
    info.update(extra or {})
    return Variant(
        name=recipe.name,
        format=fmt,
        recipe=recipe.to_dict(),
        base_hash=ckpt.hash,
        files=files,
        bytes=sum((out / f).stat().st_size for f in files),
        bpw=round(8 * data_bytes / n_params, 4),
        tools=tools,
        calibration_hash=(calib.hash or sha256_file(calib.jsonl)) if used_calib and calib.jsonl else None,
        extra=info,
    )


def _fp16_params_of(ckpt: Checkpoint, prefixes: set[str]) -> int:
    """FP16 parameter count of the weight matrices of the layers named by `prefixes`."""
    n = 0
    for f in ckpt.weight_files:
        for name, meta in safetensors_header(f).items():
            if name.endswith(".weight") and name[: -len(".weight")] in prefixes:
                c = 1
                for d in meta["shape"]:
                    c *= int(d)
                n += c
    return n


def auto_method_changed(variant: Variant, method: str) -> str | None:
    """Why an auto variant is stale when its mix was chosen by another method than `method`."""
    had = (variant.extra.get("auto") or {}).get("method")
    return None if had == method else f"its mix was chosen by auto method {had}, and orlik's is now {method}"
