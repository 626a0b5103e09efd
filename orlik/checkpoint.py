"""FP16/BF16 Hugging Face checkpoint directories: validated, hashed, loaded from safetensors only."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orlik import paths
from orlik.errors import CheckpointError
from orlik.fsutil import sha256_bytes, sha256_file_remembered

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    weight_files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Validate a checkpoint directory without loading its weights."""
        p = Path(path)
        if not p.is_dir():
            raise CheckpointError(f"checkpoint {p} does not exist or is not a directory")
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{p} has no config.json; is it a Hugging Face model directory?")
        config = _read_json(cfg_path)
        if (
            not isinstance(config, dict)
            or not isinstance(config.get("model_type"), str)
            or not config["model_type"].strip()
        ):
            raise CheckpointError(f"{cfg_path} has no model_type")
        weights = _weight_files(p)
        for w in weights:
            safetensors_header(w)  # a corruption check
        if not any((p / t).is_file() for t in TOKENIZER_FILES):
            raise CheckpointError(f"{p} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # corrupt ones fail here, not in a load
            if (p / name).is_file() and not isinstance(_read_json(p / name), dict):
                raise CheckpointError(f"{p / name} is not a JSON object")
        return cls(path=p, config=config, weight_files=weights)

    @property
    def arch(self) -> str:
        return str(self.config["model_type"])

    @property
    def name(self) -> str:
        return paths.model_name(self.path)

    @property
    def weights_bytes(self) -> int:
        return sum(w.stat().st_size for w in self.weight_files)

    @cached_property
    def n_params(self) -> int:
        """Parameters in the weight files, from their safetensors headers (no tensor is read)."""
        headers = (safetensors_layout(w)[1] for w in self.weight_files)
        return sum(math.prod(v["shape"]) for h in headers for v in h.values())

    @property
    def bpw(self) -> float:
        """Bits per weight of the checkpoint's files (16.0 for fp16/bf16)."""
        return self.weights_bytes * 8 / self.n_params if self.n_params else 16.0

    @cached_property
    def hash(self) -> str:
        """Content hash over config, weights and tokenizer: identifies this exact checkpoint."""
        parts = []
        for f in sorted(self._hashed_files()):
            parts.append(f"{f.relative_to(self.path)}:{sha256_file_remembered(f)}")
        return sha256_bytes("\n".join(parts).encode())

    def _hashed_files(self) -> list[Path]:
        names = ["config.json", *TOKENIZER_FILES, "tokenizer_config.json"]
        files = [self.path / n for n in names if (self.path / n).is_file()]
        return files + self.weight_files

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        f = self.path / "tokenizer_config.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    @property
    def chat_template(self) -> str | None:
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        tpl = self.tokenizer_config.get("chat_template")
        return tpl if isinstance(tpl, str) else None

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.path)

    def load_model(self, dtype: torch.dtype | None = None) -> PreTrainedModel:
        import torch
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(self.path),
                dtype=dtype or torch.float32,
                trust_remote_code=False,
                use_safetensors=True,
            )
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load {self.path}: {str(e).splitlines()[0]}") from None
        model.eval()
        return model


def declares_sentencepiece_llama(path: Path) -> bool:
    """True for a SentencePiece tokenizer (tokenizer.model) declared as LlamaTokenizer, as orlik's own.

    transformers 5 overrides the declared tokenizer_class for some model types (qwen2 -> its own
    byte-level Qwen2Tokenizer), which garbles such a vocabulary (Polish letters and spaces vanish),
    so these must be loaded as LlamaTokenizer explicitly."""
    path = Path(path)
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    declared = str(cfg.get("tokenizer_class") or "").removesuffix("Fast") if isinstance(cfg, dict) else ""
    return declared == "LlamaTokenizer" and (path / "tokenizer.model").is_file()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint or variant directory, never with remote code."""
    from transformers import AutoTokenizer, LlamaTokenizer

    try:
        if declares_sentencepiece_llama(path):
            return LlamaTokenizer.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # tokenizers and sentencepiece raise bare Exceptions on corrupt files
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise CheckpointError(f"cannot load the tokenizer in {path}: {lines[0]}") from None


def _read_json(path: Path) -> Any:
    """A JSON file of a checkpoint, or one line saying why it cannot be read."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid UTF-8 JSON: {str(e)[:200]}") from None


def safetensors_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """Where a safetensors file's tensor data starts, and its tensors (see `safetensors_header`)."""
    start, tensors, _ = safetensors_header(path)
    return start, tensors


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    offset: int  # from the start of the file
    size: int
    dtype: str  # safetensors' name: F16, BF16, F32, ...
    shape: list[int]


def tensor_spans(files: list[Path]) -> dict[str, TensorSpan]:
    """Every tensor of these safetensors files (a checkpoint's shards), by name, from the headers."""
    spans = {}
    for f in files:
        base, header = safetensors_layout(f)
        for name, meta in header.items():
            start, end = (int(x) for x in meta["data_offsets"])
            spans[name] = TensorSpan(f, base + start, end - start, meta["dtype"], list(meta["shape"]))
    return spans


def _weight_files(p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index} is corrupt: 'weight_map' must map tensor names to shard files")
        shards = sorted(set(wmap.values()))
        bad = [s for s in shards if not s or "/" in s or "\\" in s or s in (".", "..")]
        if bad:
            raise CheckpointError(f"{index} names a shard outside {p}: {bad[0]!r}")
        files = [p / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{p} is missing shards: {', '.join(missing)}")
        return files
    files = sorted(p.glob("*.safetensors"))
    if files:
        return files
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{p} holds only pickle weights ({', '.join(pickles)}); orlik loads safetensors only "
            "and never unpickles. Convert them with a tool you trust first."
        )
    raise CheckpointError(f"{p} has no *.safetensors weights")


# Bytes per element of the safetensors dtypes a checkpoint may hold; others are checked for bounds only.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def safetensors_header(path: Path) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """The one safetensors header reader: where the tensor data starts, the tensors (name -> dtype,
    shape, data_offsets relative to that start) and the `__metadata__` entry. Every entry is checked
    and the declared tensors must end exactly where the file does; anything else is a CheckpointError
    naming the file, so a truncated or corrupt file is caught before any tensor is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n).decode("utf-8"))
        end = _tensors_end(header)
        if 8 + n + end != size:
            raise ValueError(f"tensor data ends at {8 + n + end} but the file has {size} bytes")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(f"corrupt safetensors file {path}: {str(e)[:200]}") from None
    meta = header.pop("__metadata__", None) or {}
    return 8 + n, header, meta


def _tensors_end(header: Any) -> int:
    """Where the last tensor's data ends, after checking every entry of a safetensors header."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ValueError("__metadata__ is not an object")
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r}: entry is not an object")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise ValueError(
                f"tensor {name!r}: data_offsets must be two byte offsets, not {str(offsets)[:60]}"
            )
        if offsets[0] > offsets[1]:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} run backwards")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise ValueError(f"tensor {name!r}: shape must be a list of sizes, not {str(shape)[:60]}")
        if not isinstance(info.get("dtype"), str):
            raise ValueError(f"tensor {name!r}: no dtype")
        width = _DTYPE_BYTES.get(info["dtype"])
        if width is not None and math.prod(shape) * width != offsets[1] - offsets[0]:
            raise ValueError(
                f"tensor {name!r}: shape {shape} of {info['dtype']} does not match its data_offsets"
            )
        end = max(end, offsets[1])
    return end


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
