"""Where a checkpoint's calibration set, variants and reports live when no --out names a place.

`orlik train` writes `runs/<model>/fp16/`, so a checkpoint folder named `fp16` shares its parent
with its outputs: `runs/<model>/{calib,variants,reports}`. (`make demo` pretrains into
`runs/<model>/base/` and tunes that with SFT into `fp16/`: the chat model is the one quantized.) Any other checkpoint folder M gets a
work folder beside it, `M-orlik/{calib,variants,reports}`: orlik never writes into a user's model
directory, and two models in one parent folder never share a `variants/`.
"""

from __future__ import annotations

from pathlib import Path

FP16_DIR = "fp16"  # the folder name `orlik train` gives a checkpoint
WORK_SUFFIX = "-orlik"  # the work folder beside any other checkpoint folder

CALIB, VARIANTS, REPORTS = "calib", "variants", "reports"


def _named(model: str | Path) -> Path:
    p = Path(model)
    return p.resolve() if p.name in ("", ".", "..") else p  # "." has no name to build on


def is_run_layout(model: str | Path) -> bool:
    """True for `runs/<model>/fp16`, the layout `orlik train` writes."""
    return _named(model).name == FP16_DIR


def work_dir(model: str | Path) -> Path:
    """The folder holding calib/, variants/ and reports/ for the checkpoint at `model`."""
    p = _named(model)
    return p.parent if p.name == FP16_DIR else p.parent / f"{p.name}{WORK_SUFFIX}"


def calib_dir(model: str | Path) -> Path:
    return work_dir(model) / CALIB


def variants_dir(model: str | Path) -> Path:
    return work_dir(model) / VARIANTS


def reports_dir(model: str | Path) -> Path:
    return work_dir(model) / REPORTS


def model_name(model: str | Path) -> str:
    """A checkpoint's display name: `runs/tiny/fp16` -> tiny, `~/models/bielik` -> bielik."""
    p = Path(model).resolve()
    return p.parent.name if p.name == FP16_DIR else p.name


def default_help(kind: str) -> str:
    """The `[default: ...]` text of an option whose default is one of the folders above."""
    return (
        f"[default: MODEL/../{kind} when MODEL is a folder named {FP16_DIR}, else MODEL{WORK_SUFFIX}/{kind}]"
    )
