"""Helpers for the data and model-surgery tests: the CLI in-process, random-weight tiny checkpoints."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, NamedTuple


class Result(NamedTuple):
    code: int
    out: str
    err: str


def cli(*args: str | Path) -> Result:
    """`orlik ARGS...` through the console script's main(): exit code, stdout, stderr."""
    from orlik.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def random_checkpoint(tokenizer_dir: Path, out: Path, arch: str = "llama", seed: int = 0, **cfg: Any) -> Path:
    """A random-weight FP16 checkpoint of the tiny shape (overridable), with `tokenizer_dir`'s tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orlik.training import configs, tokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    config = configs.make_config(arch, "tiny", vocab)
    for k, v in cfg.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(str(out))
    tokenizer.copy_into(tokenizer_dir, out)
    return out


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
