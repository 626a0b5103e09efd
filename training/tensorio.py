"""Tensor-by-tensor safetensors reading and writing, for merge and upscale: flat memory.

safetensors' own `safe_open` memory-maps the file, and every page a merge touches stays counted in
the process's RSS until the map is closed, so a streamed merge would still end up "holding" every
input. Here each tensor is read with plain `readinto` into one buffer and written with `write`, so
the page cache (not counted in RSS) holds the files and the process holds one tensor per input.
The format: 8-byte little-endian header length, a JSON header of
`name -> {dtype, shape, data_offsets}` (offsets relative to the data start), then the data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from orlik.checkpoint import safetensors_header
from orlik.errors import CheckpointError

if TYPE_CHECKING:
    import torch

_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
_ITEMSIZE = {
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
CHUNK_ELEMS = 1 << 22  # elements per piece when a tensor is streamed through in pieces
SHARD_BYTES = 4 << 30  # output shard size, as transformers' save_pretrained default (5 GB) or below


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: F16, BF16, F32, ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute, in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file (in file order) and its __metadata__, from the checked
    header that `orlik.checkpoint.safetensors_header` reads."""
    start, header, meta = safetensors_header(path)
    out: dict[str, TensorInfo] = {}
    for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if v["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {v['dtype']}")
        begin, end = v["data_offsets"]
        out[name] = TensorInfo(name, v["dtype"], tuple(v["shape"]), path, start + begin, end - begin)
    return out, meta


def checkpoint_tensors(weight_files: Iterable[Path]) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) checkpoint, by name, in shard and file order."""
    tensors: dict[str, TensorInfo] = {}
    for f in weight_files:
        for name, info in read_header(f)[0].items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in both {tensors[name].file} and {f}")
            tensors[name] = info
    return tensors


class TensorReader:
    """Reads tensors one at a time through ordinary file reads (no memory map)."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}

    def read(self, info: TensorInfo) -> torch.Tensor:
        import torch

        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=getattr(torch, _DTYPES[info.dtype]))
        return self.read_flat(info, 0, info.nbytes // _ITEMSIZE[info.dtype]).view(info.shape)

    def read_flat(self, info: TensorInfo, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the tensor in row-major order, as a 1-D tensor."""
        import numpy as np
        import torch

        size = _ITEMSIZE[info.dtype]
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")  # noqa: SIM115 (closed in close())
        buf = np.empty(count * size, dtype=np.uint8)
        f.seek(info.offset + start * size)
        if f.readinto(memoryview(buf)) != count * size:
            raise CheckpointError(f"{info.file} ends inside tensor {info.name}")
        return torch.frombuffer(buf, dtype=getattr(torch, _DTYPES[info.dtype]))

    def chunks(self, info: TensorInfo, elems: int = CHUNK_ELEMS) -> Iterator[torch.Tensor]:
        """The tensor as consecutive flat pieces of at most `elems` elements."""
        n = info.nbytes // _ITEMSIZE[info.dtype]
        for start in range(0, n, elems):
            yield self.read_flat(info, start, min(elems, n - start))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, n in _DTYPES.items():
        if n == name:
            return code
    raise CheckpointError(f"cannot store dtype {name} in safetensors")


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[OutTensor], shard_bytes: int = SHARD_BYTES) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_checkpoint_weights(
    out_dir: Path,
    tensors: list[OutTensor],
    produce: Iterator[Iterable[torch.Tensor]],
    shard_bytes: int = SHARD_BYTES,
) -> list[str]:
    """Write `tensors` (names, dtypes, shapes known up front) as model.safetensors or shards plus an
    index. `produce` yields, for each tensor in the same order, its data as one or more pieces in
    row-major order (so a tensor never has to be whole in memory). Returns the file names."""
    shards = plan_shards(tensors, shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards, strict=True):
        _write_shard(out_dir / fname, shard, produce)
        weight_map.update({t.name: fname for t in shard})
        total += sum(t.nbytes for t in shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_shard(path: Path, shard: list[OutTensor], produce: Iterator[Iterable[torch.Tensor]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in shard:
            written = 0
            for x in next(produce):
                if dtype_code(x.dtype) != t.dtype:
                    raise RuntimeError(f"internal: {t.name} produced {x.dtype}, planned {t.dtype}")
                written += f.write(memoryview(x.contiguous().reshape(-1).view(_byte_dtype()).numpy()))
                del x  # before the next piece is made
            if written != t.nbytes:
                raise RuntimeError(f"internal: {t.name} produced {written} bytes, planned {t.nbytes}")
        f.flush()
        os.fsync(f.fileno())


def _byte_dtype() -> torch.dtype:
    import torch

    return torch.uint8


HF_SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json", "added_tokens.json")  # fmt: skip


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template and generation config of a checkpoint (not config or weights)."""
    import shutil

    copied = []
    for n in HF_SIDE_FILES:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)
            copied.append(n)
    return copied
