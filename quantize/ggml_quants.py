"""llama.cpp's own quantizers, called in-process through ctypes on the libggml-base build orlik
already has: the same `ggml_quantize_chunk` (with the same importance matrix) that llama-quantize
runs, and the type's `to_float` to read the result back. The allocator measures each candidate
type's error with these, so what it estimates is what llama-quantize will write.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np

from orlik import llamacpp
from orlik.errors import MissingDependencyError

# ggml_type ids (ggml.h) of the types a per-tensor override may name.
TYPE_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19,
    "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30,
}  # fmt: skip
# Types llama-quantize refuses for a tensor without importance-matrix data (llama-quant.cpp,
# tensor_requires_imatrix); ggml itself asserts on three of them.
NEEDS_IMATRIX = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class TypeInfo:
    name: str
    block: int  # weights per block; a row's length must be a multiple of it
    block_bytes: int

    @property
    def bpw(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.block_bytes

    def fits(self, row_length: int) -> bool:
        return row_length % self.block == 0


@lru_cache(maxsize=1)
def _lib() -> Any:
    path = llamacpp.bin_dir() / "libggml-base.so"
    if not path.is_file():
        raise MissingDependencyError(f"libggml-base.so not found in {llamacpp.bin_dir()}; {llamacpp.HINT}")
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return lib


@cache
def info(name: str) -> TypeInfo:
    """Block size and bytes of a ggml type, from the library itself."""
    t = _lib().ggml_get_type_traits(TYPE_IDS[name]).contents
    return TypeInfo(name, int(t.blck_size), int(t.type_size))


def quantize(name: str, rows: np.ndarray, imatrix: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """`rows` (float32, [n, row_length]) in type `name`'s blocks, as ggml_quantize_chunk writes them
    (uint8); with `threads` > 1 the rows are split between that many threads (ggml quantizes rows
    independently, so the bytes are the same)."""
    lib = _lib()
    src = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = src.shape
    dst = np.empty(n * info(name).row_bytes(k), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    bounds = np.linspace(0, n, max(1, min(threads, n // 64)) + 1).astype(int)

    def chunk(i: int) -> None:  # ctypes releases the GIL for the call
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        lib.ggml_quantize_chunk(TYPE_IDS[name], src.ctypes.data, dst.ctypes.data, lo * k, hi - lo, k,
                                None if imat is None else imat.ctypes.data)  # fmt: skip

    if len(bounds) == 2:
        chunk(0)
    else:
        with ThreadPoolExecutor(len(bounds) - 1) as pool:
            list(pool.map(chunk, range(len(bounds) - 1)))
    return dst


def dequantize(name: str, data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Blocks written by `quantize` read back to float32 rows of `shape`, by the type's to_float."""
    out = np.empty(shape, dtype=np.float32)
    to_float = _to_float_t(_lib().ggml_get_type_traits(TYPE_IDS[name]).contents.to_float)
    to_float(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out


def roundtrip(name: str, rows: np.ndarray, imatrix: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """`rows` (float32, [n, row_length]) quantized to type `name` by ggml and read back to float32;
    with `threads` > 1 the rows are split between that many threads (same result)."""
    if name == "F32":
        return rows.astype(np.float32)
    if name == "F16":
        return rows.astype(np.float16).astype(np.float32)
    return dequantize(name, quantize(name, rows, imatrix, threads), rows.shape)
