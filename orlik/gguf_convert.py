"""The F16 GGUF of a checkpoint, made once with llama.cpp's own convert_hf_to_gguf.py and cached.

Both the imatrix (calibration) and llama-quantize (quantize) start from this file, so it lives in
the core: `$ORLIK_CACHE/gguf/<checkpoint hash>/model-f16.gguf`, written atomically.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from orlik import llamacpp, owner, progress
from orlik.checkpoint import Checkpoint
from orlik.errors import CheckpointError, OutputError, ToolError
from orlik.fsutil import atomic_write_text, cache_root, check_writable

# Checkpoint dtype -> converter --outtype. F32 checkpoints go to F16: llama-quantize reads either,
# and F16 halves the cache. BF16 stays BF16 so that no weight overflows F16's range.
_OUTTYPE = {"float16": "f16", "float32": "f16", "bfloat16": "bf16"}
_UNSUPPORTED = re.compile(r"Model (\S+) is not supported")


def gguf_cache_dir() -> Path:
    return cache_root() / "gguf"


def outtype_for(ckpt: Checkpoint) -> str:
    dtype = str(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "float16")
    return _OUTTYPE.get(dtype.removeprefix("torch."), "f16")


def cached_path(ckpt: Checkpoint, outtype: str | None = None) -> Path:
    return gguf_cache_dir() / ckpt.hash / f"model-{outtype or outtype_for(ckpt)}.gguf"


def f16_gguf(ckpt: Checkpoint, *, outtype: str | None = None, force: bool = False) -> Path:
    """Path of the checkpoint's 16-bit GGUF, converting it first if the cache has none.

    The cache entry is keyed by the checkpoint's content hash and remembers the llama.cpp build
    that wrote it; a different build converts again, since converters change tensor layouts.
    """
    outtype = outtype or outtype_for(ckpt)
    final = cached_path(ckpt, outtype)
    stamp = final.with_suffix(".json")
    build = llamacpp.build_info()
    if final.parent.is_dir():  # a killed run's half-written conversion, if any (even when cached)
        owner.clean_stale_files(final)
    if not force and final.is_file() and _stamp_matches(stamp, build, final):
        return final
    converter = llamacpp.converter()
    check_writable(final.parent)
    tmp = owner.partial_name(final)
    cmd = [sys.executable, str(converter), str(ckpt.path), "--outtype", outtype, "--outfile", str(tmp)]
    progress.info(f"gguf: converting {ckpt.path} to {outtype.upper()} with convert_hf_to_gguf.py")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              preexec_fn=llamacpp.die_with_parent)  # fmt: skip
        if proc.returncode != 0:
            raise _conversion_error(ckpt, proc.stdout + proc.stderr)
        if not tmp.is_file():
            raise ToolError(f"convert_hf_to_gguf.py exited 0 but wrote no {tmp.name}")
        os.replace(tmp, final)
    except OSError as e:
        raise _os_error(e, final) from None
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(
        stamp,
        json.dumps(
            {"checkpoint": str(ckpt.path), "checkpoint_hash": ckpt.hash, "outtype": outtype,
             "llama_cpp": build, "bytes": final.stat().st_size},
            indent=2,
        )
        + "\n",
    )  # fmt: skip
    return final


def _stamp_matches(stamp: Path, build: str, final: Path) -> bool:
    try:
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("llama_cpp") == build and data.get("bytes") == final.stat().st_size


def _conversion_error(ckpt: Checkpoint, log: str) -> Exception:
    m = _UNSUPPORTED.search(log)
    if m:
        return CheckpointError(
            f"llama.cpp's convert_hf_to_gguf.py cannot convert architecture {m.group(1)} "
            f"(model_type {ckpt.arch!r}) in {ckpt.path}; GGUF needs an architecture llama.cpp supports "
            "(llama, mistral and qwen2 are among them)"
        )
    if "No space left on device" in log:
        return OutputError(f"disk full while converting {ckpt.path} to GGUF; nothing was kept")
    return ToolError(f"convert_hf_to_gguf.py failed on {ckpt.path}: {_last_error(log)}")


def _last_error(log: str) -> str:
    """The most telling line of a Python tool's output: the exception, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^(\w+(\.\w+)*(Error|Exception)\b|ERROR:)", ln):
            return ln
    return lines[-1] if lines else "no output"


def _os_error(e: OSError, where: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {where}; nothing was kept")
    return OutputError(f"cannot write {where}: {e.strerror or e}")
