"""Read GGUF files back with the `gguf` package: tensor types and bits per weight of a model, the
metadata a server needs (GGUFMeta), and the entries of an importance matrix, checked against the
model they are meant for.

Calibration writes imatrices and quantize consumes them, so the reading side lives in the core.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from orlik.errors import InputError

# Keys orlik adds to an imatrix beside llama.cpp's own imatrix.{datasets,chunk_count,chunk_size}.
KEY_CALIB_SHA = "orlik.calibration.sha256"
KEY_CALIB_LANG = "orlik.calibration.lang"
KEY_CALIB_TOKENS = "orlik.calibration.tokens"
KEY_BASE_SHA = "orlik.base.sha256"
# What llama-quantize skips when it applies an imatrix: 1-D tensors and the tied/untied embeddings.
_NO_IMATRIX = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. "Q4_K"
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    n_elements: int
    n_bytes: int


@dataclass
class GGUFSummary:
    path: Path
    tensors: list[TensorInfo]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Tensor-data bits over all parameters (norms included): llama.cpp's own "BPW" figure."""
        return 8.0 * self.tensor_bytes / self.n_params

    @property
    def blocks_bpw(self) -> float:
        """Bits per weight of the transformer blocks' weight matrices alone (no embeddings, output or
        norms): the figure the type's name promises, which small-vocabulary models hide in `bpw`."""
        mats = [t for t in self.tensors if len(t.ne) >= 2 and t.name.startswith("blk.")]
        return 8.0 * sum(t.n_bytes for t in mats) / max(1, sum(t.n_elements for t in mats))

    def type_histogram(self) -> dict[str, int]:
        return dict(sorted(Counter(t.type for t in self.tensors).items()))

    def types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        from orlik.errors import MissingDependencyError

        raise MissingDependencyError("the gguf package is missing; pip install 'orlik[gguf]'") from None
    try:
        return gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, KeyError) as e:
        raise InputError(f"{path} is not a readable GGUF file: {e}") from None


def _value(field: Any) -> Any:
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError):
        return None


def architecture(path: str | Path) -> str | None:
    """`general.architecture` of a little-endian GGUF file when it is among the first metadata pairs
    before any array (convert_hf_to_gguf.py writes it first), read without parsing the rest of the
    header (which for a 150k vocabulary takes gguf-py over a second); None otherwise."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if head[:4] != b"GGUF" or struct.unpack_from("<I", head, 4)[0] not in (2, 3):
        return None
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # scalar value types
    pos, (n_kv,) = 24, struct.unpack_from("<Q", head, 16)
    try:
        for _ in range(min(n_kv, 8)):
            (n,) = struct.unpack_from("<Q", head, pos)
            key = head[pos + 8 : pos + 8 + n].decode("utf-8")
            (vtype,) = struct.unpack_from("<I", head, pos + 8 + n)
            pos += 12 + n
            if vtype == 8:  # string
                (m,) = struct.unpack_from("<Q", head, pos)
                if key == "general.architecture":
                    return head[pos + 8 : pos + 8 + m].decode("utf-8")
                pos += 8 + m
            elif vtype in sizes:
                pos += sizes[vtype]
            else:
                return None
    except (struct.error, UnicodeDecodeError):
        return None
    return None


def summarize(path: str | Path, keys: tuple[str, ...] = ()) -> GGUFSummary:
    """Tensors of a GGUF file (types, shapes, sizes) and the metadata values named in `keys`."""
    path = Path(path)
    r = _reader(path)
    tensors = [
        TensorInfo(
            t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_elements), int(t.n_bytes)
        )
        for t in r.tensors
    ]
    meta = {k: _value(r.fields[k]) for k in keys if k in r.fields}
    return GGUFSummary(path, tensors, meta)


@dataclass
class GGUFMeta:
    """The few metadata fields a server needs before (or without) loading a model: chat template,
    special tokens and the shapes for a KV-cache memory estimate."""

    arch: str
    n_ctx_train: int
    n_vocab: int
    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    chat_template: str | None
    bos_id: int | None
    bos_token: str
    eos_token: str
    eos_ids: set[int] = field(default_factory=set)

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V for every layer: what one token of context costs in llama.cpp's cache."""
        head_dim = self.n_embd // max(1, self.n_heads)
        return 2 * 2 * self.n_layers * self.n_kv_heads * head_dim

    @staticmethod
    def read(path: str | Path) -> GGUFMeta:
        """Memory-mapped; no tensor data is touched. Cached per resolved path."""
        return _read_meta(str(Path(path).resolve()))


@lru_cache(maxsize=16)
def _read_meta(path: str) -> GGUFMeta:
    r = _reader(Path(path))

    def get(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = str(get("general.architecture", ""))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else int(get(f"{arch}.vocab_size", 0))

    def tok_text(i: Any) -> str:
        if i is None or tokens is None or not 0 <= int(i) < n_vocab:
            return ""
        return str(tokens.contents(int(i)))

    bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    eos_ids = {
        int(v) for k in ("eos", "eot", "eom") if (v := get(f"tokenizer.ggml.{k}_token_id")) is not None
    }
    n_heads = int(get(f"{arch}.attention.head_count", 1) or 1)
    return GGUFMeta(
        arch=arch,
        n_ctx_train=int(get(f"{arch}.context_length", 0) or 0),
        n_vocab=n_vocab,
        n_layers=int(get(f"{arch}.block_count", 0) or 0),
        n_embd=int(get(f"{arch}.embedding_length", 0) or 0),
        n_heads=n_heads,
        n_kv_heads=int(get(f"{arch}.attention.head_count_kv", n_heads) or n_heads),
        chat_template=get("tokenizer.chat_template"),
        bos_id=None if bos is None else int(bos),
        bos_token=tok_text(bos),
        eos_token=tok_text(eos),
        eos_ids=eos_ids,
    )


def metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file except the (large) tokenizer arrays."""
    r = _reader(Path(path))
    return {k: _value(f) for k, f in r.fields.items() if not k.startswith(("GGUF.", "tokenizer.ggml."))}


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, tuple[int, int]]  # weight name -> (row length ne[0], matrices/experts)
    datasets: list[str]
    chunk_count: int | None
    chunk_size: int | None
    orlik: dict[str, Any]

    @property
    def calibration_hash(self) -> str | None:
        v = self.orlik.get(KEY_CALIB_SHA)
        return str(v) if v else None


@lru_cache(maxsize=16)
def _read_imatrix(path: Path, mtime: float) -> Imatrix:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return _read_legacy_imatrix(path)
    r = _reader(path)
    gtype = _value(r.fields["general.type"]) if "general.type" in r.fields else None
    if gtype != "imatrix":
        raise InputError(f"{path} is a GGUF file but not an imatrix (general.type is {gtype!r})")
    sums: dict[str, int] = {}
    counts: dict[str, int] = {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = int(t.n_elements)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = int(t.n_elements)
    if not sums or set(sums) != set(counts):
        raise InputError(f"{path}: imatrix has no entries or unpaired in_sum2/counts tensors")
    entries = {n: (sums[n] // counts[n], counts[n]) for n in sums}
    meta = {k: _value(f) for k, f in r.fields.items() if k.startswith("orlik.")}

    def u32(key: str) -> int | None:
        return int(_value(r.fields[key])) if key in r.fields else None

    datasets = _value(r.fields["imatrix.datasets"]) if "imatrix.datasets" in r.fields else []
    return Imatrix(
        path, entries, list(datasets or []), u32("imatrix.chunk_count"), u32("imatrix.chunk_size"), meta
    )


def _read_legacy_imatrix(path: Path) -> Imatrix:
    """The pre-GGUF `imatrix.dat` layout: n, then per entry name, ncall, nval, nval floats."""
    import struct

    data = path.read_bytes()
    entries: dict[str, tuple[int, int]] = {}
    try:
        (n,), off = struct.unpack_from("<i", data), 4
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, off)
            name = data[off + 4 : off + 4 + ln].decode("utf-8")
            off += 4 + ln
            _ncall, nval = struct.unpack_from("<ii", data, off)
            off += 8 + 4 * nval
            entries[name] = (nval, 1)
        if n <= 0 or off > len(data):
            raise ValueError("truncated")
    except (struct.error, UnicodeDecodeError, ValueError):
        raise InputError(f"{path} is neither a GGUF imatrix nor a legacy imatrix.dat") from None
    return Imatrix(path, entries, [], None, None, {})


def read_imatrix(path: str | Path) -> Imatrix:
    """The entries and metadata of a GGUF imatrix as llama-imatrix writes it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"imatrix {p} does not exist")
    return _read_imatrix(p.resolve(), p.stat().st_mtime)


def check_imatrix(imatrix: str | Path | Imatrix, model: str | Path | GGUFSummary) -> Imatrix:
    """Fail, naming the first mismatches, when an imatrix was not computed on `model`'s shapes.

    llama-quantize itself only warns about names it cannot find, and aborts midway on a size
    mismatch; orlik checks every weight matrix before any quantization starts.
    """
    im = imatrix if isinstance(imatrix, Imatrix) else read_imatrix(imatrix)
    summary = model if isinstance(model, GGUFSummary) else summarize(model)
    tensors = summary.by_name()
    problems: list[str] = []
    for name, (ne0, nmat) in sorted(im.entries.items()):
        t = tensors.get(name)
        if t is None:
            problems.append(f"{name} is not in the model")
            continue
        want = (t.ne[0], t.ne[2] if len(t.ne) > 2 else 1)
        # A legacy .dat entry stores experts flattened (nmat 1), so compare totals there.
        if ne0 * nmat != want[0] * want[1] or (nmat != 1 and nmat != want[1]):
            problems.append(f"{name} has {ne0}x{nmat} values, the model needs {want[0]}x{want[1]}")
    matrices = [
        n for n, t in tensors.items() if len(t.ne) >= 2 and n.startswith("blk.") and n not in _NO_IMATRIX
    ]
    missing = [n for n in matrices if n not in im.entries]
    if missing:
        problems.append(
            f"{len(missing)} of the model's {len(matrices)} weight matrices have no entry (e.g. {missing[0]})"
        )
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise InputError(
            f"imatrix {im.path.name} does not match {summary.path.name}: shape mismatch: "
            f"{'; '.join(problems[:2])}{more}; was it computed on another model?"
        )
    return im
