"""Recipes: what to quantize to. A dataclass with from_name/from_dict, and named presets.

Names are the user-facing handles: "Q4_K_M" / "Q4_K_M-imat" (GGUF without/with importance
matrix), "gptq-w4g128", "awq-w4g128", "hqq-3bit-g64", "exl2-4.0bpw", "mlx-q4" (group 64) or
"mlx-q4-g32". Everything a backend needs beyond that lives in `options` and `overrides`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from orlik.errors import InputError, UnknownNameError

FORMATS = ("gguf", "gptq", "awq", "hqq", "exl2", "mlx")


@dataclass(frozen=True)
class Recipe:
    name: str
    format: str
    qtype: str | None = None  # GGUF type name, e.g. "Q4_K_M"
    bits: float | None = None  # weight bits (GPTQ/AWQ/HQQ/MLX) or target bpw (EXL2)
    group_size: int | None = None  # None = per-channel where the format allows it
    imatrix: bool = False  # GGUF: quantize with the importance matrix
    calibration: bool = False  # the backend reads the calibration set
    output_type: str | None = None  # GGUF: type of output.weight (lm_head)
    embedding_type: str | None = None  # GGUF: type of token_embd.weight
    overrides: tuple[tuple[str, str], ...] = ()  # (tensor glob, type) pairs, first match wins
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [list(p) for p in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        if not isinstance(d, dict):
            raise InputError("a recipe must be a mapping")
        if "name" in d and set(d) == {"name"}:
            return cls.from_name(d["name"])
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"recipe has unknown field(s): {', '.join(unknown)}")
        if d.get("format") not in FORMATS:
            raise UnknownNameError("format", str(d.get("format")), FORMATS)
        d = dict(d)
        ov = d.get("overrides") or ()
        if isinstance(ov, dict):
            ov = list(ov.items())
        try:
            d["overrides"] = tuple((str(g), str(t)) for g, t in ov)
        except (TypeError, ValueError):
            raise InputError("recipe overrides must be {glob: type} or [[glob, type], ...]") from None
        d.setdefault("name", _default_name(d))
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> Recipe:
        for pattern, build in _PARSERS:
            m = re.fullmatch(pattern, name, flags=re.IGNORECASE)
            if m:
                return build(m, name)
        raise UnknownNameError("recipe", name, [*sorted(PRESETS), "<GGUF type>[-imat]", *_EXAMPLES])


def _default_name(d: dict[str, Any]) -> str:
    if d["format"] == "gguf":
        return f"{d.get('qtype')}{'-imat' if d.get('imatrix') else ''}"
    g = d.get("group_size")
    return f"{d['format']}-{d.get('bits')}bit" + (f"-g{g}" if g else "")


# GGUF types orlik builds (llama-quantize file types).
GGUF_TYPES = (
    "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S",
    "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)  # fmt: skip
# File types llama-quantize refuses to make without an imatrix: their mixes put some tensors in
# IQ1_*/IQ2_*/IQ3_XXS (IQ3_XS: attn_q/k; IQ2_M: IQ2_S) or, for Q2_K_S, Q2_K that needs one.
# Measured with `llama-quantize --dry-run` on every type (tests/test_gguf.py checks it stays true).
GGUF_REQUIRES_IMATRIX = ("IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
                         "Q2_K_S")  # fmt: skip
# Tensor (ggml) types a per-tensor override may name, and those that need an imatrix themselves.
GGUF_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K",
    "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)  # fmt: skip
GGUF_TENSOR_TYPES_REQUIRING_IMATRIX = ("IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")

_EXAMPLES = ["gptq-w4g128", "gptq-w4g128-act", "awq-w4g128", "hqq-3bit-g64", "exl2-4.0bpw", "mlx-q4",
             "mlx-q4-g32", "mlx-q4-h6", "mlx-q4-awq", "auto", "auto-90MiB", "auto-3.5bpw", "auto-like-Q3_K_M",
             "mlx-auto-4.5bpw"]  # fmt: skip


def _gguf(m: re.Match[str], name: str) -> Recipe:
    qtype = m.group(1).upper()
    if qtype not in GGUF_TYPES:
        raise UnknownNameError("GGUF type", qtype, GGUF_TYPES)
    imat = bool(m.group(2))
    return Recipe(name=f"{qtype}{'-imat' if imat else ''}", format="gguf", qtype=qtype, imatrix=imat,
                  calibration=imat)  # fmt: skip


def _grouped(fmt: str, calibration: bool) -> Any:
    def build(m: re.Match[str], name: str) -> Recipe:
        bits = int(m.group(1))
        g = m.group(2)
        return Recipe(name=name.lower(), format=fmt, bits=bits, group_size=int(g) if g else None,
                      calibration=calibration)  # fmt: skip

    return build


def _gptq(m: re.Match[str], name: str) -> Recipe:
    # "-act": GPTQ with act-order (desc_act), quantizing columns by decreasing Hessian diagonal.
    r = _grouped("gptq", True)(m, name)
    return replace(r, options={"act_order": True}) if m.group(3) else r


def _exl2(m: re.Match[str], name: str) -> Recipe:
    return Recipe(name=name.lower(), format="exl2", bits=float(m.group(1)), calibration=True,
                  options={"head_bits": int(m.group(2) or 6)})  # fmt: skip


def _mlx(m: re.Match[str], name: str) -> Recipe:
    # "-h6": embeddings and output head at 6 bits over the body's bits (mlx-lm's mixed recipes).
    # "-awq": mlx-lm's activation-aware quantization on the calibration set.
    head = (("lm_head", m.group(3)), ("model.embed_tokens", m.group(3))) if m.group(3) else ()
    awq = bool(m.group(4))
    return Recipe(name=name.lower(), format="mlx", bits=int(m.group(1)), group_size=int(m.group(2) or 64),
                  overrides=head, calibration=awq, options={"method": "awq"} if awq else {})  # fmt: skip


_SIZE = r"\d+(?:\.\d+)?[KMGT]i?B"


def _auto(m: re.Match[str], name: str) -> Recipe:
    """Size-budgeted recipes: "auto" (target from --target-size/--target-bpw), "auto-90MiB", "auto-3.5bpw", "auto-like-Q3_K_M"
    (the stock type's file size, same imatrix): per-tensor GGUF types chosen by measured sensitivity.
    "mlx-auto[-4.5bpw]": the same allocator over MLX bits and group sizes."""
    mlx, like, size, bpw = m.group(1), m.group(2), m.group(3), m.group(4)
    opts: dict[str, Any] = {"auto": True}
    if like:
        like = like.upper()
        if like not in GGUF_TYPES or like in ("F16", "BF16") or mlx:
            raise UnknownNameError("stock type to match", like, [t for t in GGUF_TYPES if "F16" not in t])
        opts["like"] = like
    elif size:
        opts["target_size"] = size
    elif bpw:
        opts["target_bpw"] = float(bpw)
    base = "mlx-auto" if mlx else "auto"
    tail = f"-like-{like}" if like else f"-{size}" if size else f"-{bpw}bpw" if bpw else ""
    if mlx:
        return Recipe(name=base + tail, format="mlx", calibration=True, options=opts)
    return Recipe(name=base + tail, format="gguf", imatrix=True, calibration=True, options=opts)


def with_target(recipes: list[Recipe], size: str | None = None, bpw: float | None = None) -> list[Recipe]:
    """Bare "auto"/"mlx-auto" recipes given the target of --target-size or --target-bpw."""
    if size is None and bpw is None:
        return recipes
    if size is not None and bpw is not None:
        raise InputError("give --target-size or --target-bpw, not both")
    bare = [r for r in recipes if r.options.get("auto") and r.name in ("auto", "mlx-auto")]
    if not bare:
        raise InputError("--target-size/--target-bpw apply to --recipe auto or mlx-auto")
    tail = f"-{size}" if size is not None else f"-{bpw:g}bpw"
    opt = {"target_size": size} if size is not None else {"target_bpw": float(bpw)}  # type: ignore[arg-type]
    return [replace(r, name=r.name + tail, options={**r.options, **opt}) if r in bare else r for r in recipes]


_PARSERS: list[tuple[str, Any]] = [
    (r"(mlx-)?auto(?:-like-([A-Z0-9_]+)|-(" + _SIZE + r")|-(\d+(?:\.\d+)?)bpw)?", _auto),
    (r"([A-Z0-9_]+?)(-imat)?", _gguf),
    (r"gptq-w(\d)(?:g(\d+))?(-act)?", _gptq),
    (r"awq-w(\d)(?:g(\d+))?", _grouped("awq", True)),
    (r"hqq-(\d)bit(?:-g(\d+))?", _grouped("hqq", False)),
    (r"exl2-(\d+(?:\.\d+)?)bpw(?:-h(\d))?", _exl2),
    (r"mlx-q(\d)(?:-g(\d+))?(?:-h(\d))?(-awq)?", _mlx),
]
# The GGUF pattern matches any upper-case word; try the specific patterns first.
_PARSERS = _PARSERS[:1] + _PARSERS[2:] + _PARSERS[1:2]

TABLE8 = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
PRESETS: dict[str, tuple[str, ...]] = {
    # Bielik 7B Table 8: each type without and with the importance matrix, plus IQ2_XXS for phones.
    "bielik-table8": (*(n for t in TABLE8 for n in (t, f"{t}-imat")), "IQ2_XXS-imat"),
    # The non-GGUF variants the Bielik models ship, as the demo builds them beside the GGUF ones.
    "bielik-other": ("gptq-w4g128", "awq-w4g128", "hqq-3bit-g64", "hqq-4bit-g64", "mlx-q4", "mlx-q3"),
    # Size-budgeted mixes at the sizes of three stock Table 8 types (same imatrix): the auto comparison.
    "auto-table8": ("auto-like-Q4_K_M", "auto-like-Q3_K_M", "auto-like-Q2_K"),
    "gguf-all": tuple(t for t in GGUF_TYPES if t not in ("F16", "BF16") and t not in GGUF_REQUIRES_IMATRIX)
    + tuple(f"{t}-imat" for t in GGUF_TYPES if t not in ("F16", "BF16")),
}


def expand(names: list[str] | tuple[str, ...]) -> list[Recipe]:
    """Recipe names and preset names -> recipes, in order, without duplicates."""
    out: dict[str, Recipe] = {}
    for n in names:
        for item in PRESETS.get(n, (n,)):
            r = Recipe.from_name(item)
            out.setdefault(r.name, r)
    if not out:
        raise InputError("no recipes given")
    return list(out.values())
